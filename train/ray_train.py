"""Training on a Ray cluster: Ray Train runs the same Lightning trainer on N workers (DDP).

    python -m train.ray_train --config configs/lidit-1b.yaml --workers 8 --gpus
    RAY_ADDRESS=http://head:8265 ray job submit --working-dir . -- \
        python -m train.ray_train --config configs/lidit-1b.yaml --workers 8 --gpus

Each worker builds the module and data module from the config; the sampler reads the
worker's rank and world size from the trainer, so the ranks read disjoint batches. The
cache and run_dir must be on storage every worker can reach: an object-store URI
(s3://...; the workers get this process's endpoint and region, and the keys from their
own nodes' environment or role) or a shared file system. A curriculum (train.stages) is
one Ray Train run per stage, in order, the finished ones skipped (train/curriculum.py).
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import sys


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: the same run_train as `python -m train`, with train.strategy's
    Lightning strategy (DDP, or FSDP2 for fsdp) over the Ray workers."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from store.config import config_from_dict
    from train.run import run_train

    config = config_from_dict(loop_config["config"])
    if config.train.strategy == "fsdp":
        strategy, prepare = ray_sharded_strategy(ray.train.get_context().get_world_size()), None
    else:
        strategy, prepare = RayDDPStrategy(), prepare_trainer
    run_train(config, fresh=loop_config["fresh"], progress=loop_config["progress"], prepare=prepare,
              devices="auto", accelerator="auto", strategy=strategy, plugins=[RayLightningEnvironment()])


def ray_sharded_strategy(workers: int):
    """train.strategy fsdp on Ray Train workers: train/run.py's sharded strategy, each worker
    one data-parallel shard on the device Ray gave it (Ray's prepare_trainer knows DDP, FSDP1
    and DeepSpeed only, so it is not called; RayLightningEnvironment gives the ranks)."""
    import ray.train.torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from train.run import sharded_strategy

    class RayModelParallelStrategy(ModelParallelStrategy):
        @property
        def root_device(self):
            return ray.train.torch.get_device()

    return sharded_strategy(workers, RayModelParallelStrategy)


def ray_storage(config) -> str:
    """Where Ray Train keeps its own run state: beside the run, a URI or an absolute path."""
    from store.storage import RemotePath

    where = config.run_path / "ray"
    return str(where) if isinstance(where, RemotePath) else str(where.resolve())


def run_ray_train(config, workers: int, gpus: bool, progress: bool = True, fresh: bool = False):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "progress": progress, "fresh": fresh},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus,
                                     resources_per_worker={"CPU": config.train.num_workers + 1}),
        run_config=RunConfig(name=f"lidit-{config.name}", storage_path=ray_storage(config)),
    )
    return trainer.fit()


def run_ray_stages(config, workers: int, gpus: bool, progress: bool = True, log=print) -> int:
    """Train `config` with Ray Train, a curriculum (train.stages) as one Ray Train run per
    stage, skipping the finished ones as `python -m train` does (train/curriculum.py). Returns
    the exit code: 1 if a run failed, what ran before it kept."""
    from store.config import stage_configs
    from train.curriculum import stage_plan

    if len(stages := stage_configs(config)) == 1:  # one training, resumed if interrupted
        result = run_ray_train(stages[0], workers, gpus, progress)
        log(f"ray train: finished; error: {result.error}; weights in {stages[0].run_path / 'checkpoints'}")
        return 0 if result.error is None else 1
    for _, _, label, stage, done, stale in stage_plan(config):
        if done is not None and not stale:
            log(f"ray train: {label}: done before ({done} steps in {stage.run_path}); skipped")
            continue
        result = run_ray_train(stage, workers, gpus, progress, fresh=stale)  # stale: retrained from the start
        log(f"ray train: {label}: finished; error: {result.error}; weights in {stage.run_path / 'checkpoints'}")
        if result.error is not None:
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import ray

    from store.config import ConfigError, load_config

    parser = cli.config_parser("python -m train.ray_train", __doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    from store.storage import storage_env

    # Workers on other nodes do not inherit this environment: pass the endpoint and region on.
    ray.init(log_to_driver=True, runtime_env={"env_vars": storage_env()})
    try:
        return run_ray_stages(config, args.workers, args.gpus)
    except ConfigError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
