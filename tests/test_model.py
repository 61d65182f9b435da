"""The networks: refiners, collaborative refiner, LI-DiT and the whole denoiser, at tiny sizes."""

import importlib.util

import pytest
import torch

from train.layers import Attention, Mlp, apply_rope, masked_mean, rope_2d, sincos_2d
from train.lidit import ConvPositionEmbedding, LIDiT
from train.model import TextToImageModel
from train.refiner import (
    CollaborativeRefiner,
    LanguageTokenRefiner,
    LanguageTokenRefinerBlock,
    LLMInfusedDiffuser,
)

DIM, HEADS = 32, 4
TINY_MODEL = dict(encoders=[(24, 3), (16, 0)], in_channels=4, patch=2, dim=DIM, depth=2, heads=HEADS,
                  refiner_depth=2, collab_depth=1)


def _perturb_zero_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every all-zero parameter (gates, adaLN, output layers) random values, so paths open."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return module


def _mask(lengths: list[int], max_len: int) -> torch.Tensor:
    """Right-padded mask [B, max_len], True on the first lengths[b] positions."""
    return torch.arange(max_len)[None] < torch.tensor(lengths)[:, None]


def _append_padding(x: torch.Tensor, mask: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `extra` tokens of garbage, masked out: [B, L, D] -> [B, L + extra, D]."""
    garbage = 100 * torch.randn(x.shape[0], extra, x.shape[2], generator=torch.Generator().manual_seed(1))
    return torch.cat([x, garbage], dim=1), torch.cat([mask, torch.zeros(x.shape[0], extra, dtype=torch.bool)], dim=1)


def _text(seed: int = 0, lengths=((7, 4), (5, 2)), lens=(8, 6)):
    """Features and masks for TINY_MODEL's two encoders, batch 2."""
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, L, d, generator=generator) for L, (d, _) in zip(lens, TINY_MODEL["encoders"])]
    masks = [_mask(list(n), L) for n, L in zip(lengths, lens)]
    return features, masks


def test_refiner_block_is_identity_at_init():
    torch.manual_seed(0)
    block = LanguageTokenRefinerBlock(DIM, HEADS, gate=True)
    x, c = torch.randn(2, 6, DIM), torch.randn(2, DIM)
    assert torch.equal(block(x, _mask([6, 3], 6), c), x)


def _first_token_before_and_after_changing_the_last(causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    block = _perturb_zero_init(LanguageTokenRefinerBlock(DIM, HEADS, causal=causal))
    x, c, mask = torch.randn(1, 6, DIM), torch.randn(1, DIM), _mask([6], 6)
    changed = x.clone()
    changed[:, -1] = torch.randn(DIM)
    return block(x, mask, c)[:, 0], block(changed, mask, c)[:, 0]


def test_full_attention_refiner_lets_first_token_see_last_token():
    before, after = _first_token_before_and_after_changing_the_last(causal=False)
    assert (before - after).abs().max() > 1e-3


def test_causal_refiner_first_token_ignores_last_token():
    before, after = _first_token_before_and_after_changing_the_last(causal=True)
    torch.testing.assert_close(before, after, atol=1e-6, rtol=0)


def _refiner_outputs(pad: int):
    torch.manual_seed(0)
    refiner = _perturb_zero_init(LanguageTokenRefiner(24, DIM, depth=2, heads=HEADS))
    x, mask = torch.randn(2, 6, 24), _mask([6, 3], 6)
    x, mask = _append_padding(x, mask, pad)
    out = refiner(x, mask, torch.randn(2, DIM))
    return out[:, :6][mask[:, :6]]  # [real tokens, D]


def _collaborative_outputs(pad: int):
    torch.manual_seed(0)
    collab = _perturb_zero_init(CollaborativeRefiner(2, DIM, depth=2, heads=HEADS))
    xs, masks = [torch.randn(2, 5, DIM), torch.randn(2, 4, DIM)], [_mask([5, 2], 5), _mask([3, 4], 4)]
    padded = [_append_padding(x, m, pad) for x, m in zip(xs, masks)]
    outs = collab([x for x, _ in padded], [m for _, m in padded], list(torch.randn(2, 2, DIM)))
    return torch.cat([out[:, :x.shape[1]][m] for out, x, m in zip(outs, xs, masks)])


def _lidit_outputs(pad: int):
    torch.manual_seed(0)
    dit = _perturb_zero_init(LIDiT(4, 2, DIM, depth=2, heads=HEADS))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    cond, cond_mask = _append_padding(torch.randn(2, 5, DIM), _mask([5, 2], 5), pad)
    return dit(x, t, cond, cond_mask)


SWITCHES = dict(feature_norm="rms", collab_condition="mean", mlp_conv=True, rope=True, abs_pos=True,
                pooled_text=False, pos_conv="separable")


def _model_outputs(pad: int, **switches):
    torch.manual_seed(0)
    model = _perturb_zero_init(TextToImageModel(**TINY_MODEL, **switches))
    features, masks = _text()
    padded = [_append_padding(f, m, pad) for f, m in zip(features, masks)]
    return model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), [f for f, _ in padded], [m for _, m in padded])


def _model_outputs_with_switches(pad: int):
    return _model_outputs(pad, **SWITCHES)


@pytest.mark.parametrize("outputs", [_refiner_outputs, _collaborative_outputs, _lidit_outputs, _model_outputs,
                                     _model_outputs_with_switches],
                         ids=["refiner", "collaborative", "lidit", "whole_model", "whole_model_switches"])
def test_padding_does_not_change_real_token_outputs(outputs):
    torch.testing.assert_close(outputs(pad=0), outputs(pad=5), atol=1e-5, rtol=0)


def test_attention_rows_without_keys_output_exact_zeros():
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS)
    x, context = torch.randn(2, 3, DIM), torch.randn(2, 4, DIM)
    out = attn(x, context=context, key_mask=_mask([0, 4], 4))
    assert torch.equal(out[0], torch.zeros(3, DIM))
    assert out[1].abs().sum() > 0


def test_sample_prediction_returns_the_velocity_of_the_heads_clean_image():
    """model.prediction=sample: the same weights' head output, read as x0, becomes (x_t - x0) / t."""
    features, masks = _text()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0])
    outputs = {}
    for prediction in ("velocity", "sample"):
        torch.manual_seed(0)
        model = _perturb_zero_init(TextToImageModel(**TINY_MODEL, prediction=prediction))
        outputs[prediction] = model(x, t, features, masks)
    clean = outputs["velocity"]  # the head's raw output, as the velocity model returns it
    torch.testing.assert_close(outputs["sample"], (x - clean) / (t / 1000).view(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="prediction='noise'; allowed: velocity, sample"):
        TextToImageModel(**TINY_MODEL, prediction="noise")


def test_fully_padded_text_gives_no_nan():
    torch.manual_seed(0)
    model = _perturb_zero_init(TextToImageModel(**TINY_MODEL))
    features, masks = _text(lengths=((0, 0), (0, 0)))
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), features, masks)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("patch, sizes", [(2, [(16, 16), (16, 32)]), (4, [(32, 24), (16, 16)])])
def test_lidit_runs_at_several_resolutions_with_the_same_weights(patch, sizes):
    torch.manual_seed(0)
    dit = _perturb_zero_init(LIDiT(4, patch, DIM, depth=1, heads=HEADS))
    cond, cond_mask = torch.randn(2, 5, DIM), _mask([5, 2], 5)
    for H, W in sizes:
        out = dit(torch.randn(2, 4, H, W), torch.tensor([1.0, 999.0]), cond, cond_mask)
        assert out.shape == (2, 4, H, W)
        assert torch.isfinite(out).all()


def test_lidit_rejects_a_latent_the_patch_does_not_divide():
    dit = LIDiT(4, 4, DIM, depth=1, heads=HEADS)
    with pytest.raises(ValueError, match="18x16 is not divisible by the patch size 4"):
        dit(torch.randn(1, 4, 18, 16), torch.tensor([1.0]), torch.randn(1, 2, DIM), _mask([2], 2))


def test_lidit_predicts_zero_at_init():
    dit = LIDiT(4, 2, DIM, depth=2, heads=HEADS)
    out = dit(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 3, DIM), _mask([3, 1], 3))
    assert torch.equal(out, torch.zeros(2, 4, 8, 8))


def test_instruction_tokens_are_dropped_and_branches_concatenated():
    torch.manual_seed(0)
    diffuser = LLMInfusedDiffuser(TINY_MODEL["encoders"], DIM, HEADS, fusion="concat")
    features, masks = _text(lengths=((7, 4), (5, 2)), lens=(8, 6))
    t_emb = torch.randn(2, DIM)
    cond, cond_mask = diffuser(features, masks, t_emb)
    assert cond.shape == (2, (8 - 3) + (6 - 0), DIM)
    assert torch.equal(cond_mask, torch.cat([masks[0][:, 3:], masks[1]], dim=1))
    assert cond_mask.sum(dim=1).tolist() == [(7 - 3) + 5, (4 - 3) + 2]
    torch.testing.assert_close(cond[:, :5], diffuser.refiners[0](features[0], masks[0], t_emb)[:, 3:])
    torch.testing.assert_close(cond[:, 5:], diffuser.refiners[1](features[1], masks[1], t_emb))


def test_collaborative_refiner_mixes_branches():
    torch.manual_seed(0)
    collab = _perturb_zero_init(CollaborativeRefiner(2, DIM, depth=1, heads=HEADS))
    a, b, c = torch.randn(1, 4, DIM), torch.randn(1, 5, DIM), [torch.randn(1, DIM)] * 2
    masks = [_mask([4], 4), _mask([5], 5)]
    before = collab([a, b], masks, c)[0]
    after = collab([a, torch.randn_like(b)], masks, c)[0]
    assert (before - after).abs().max() > 1e-3


def test_collaborative_refiner_with_one_branch_is_the_identity():
    collab = CollaborativeRefiner(1, DIM, depth=2, heads=HEADS)
    x = torch.randn(2, 4, DIM)
    assert len(list(collab.parameters())) == 0
    assert collab([x], [_mask([4, 1], 4)], [torch.randn(2, DIM)])[0] is x


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_backend_without_xformers_is_a_clear_error():
    with pytest.raises(ImportError, match="needs the xformers package"):
        Attention(DIM, HEADS, backend="xformers")


def test_a_few_hundred_steps_overfit_a_tiny_batch():
    torch.manual_seed(0)
    model = TextToImageModel(**TINY_MODEL)
    features, masks = _text()
    x, target, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = (model(x, t, features, masks) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_the_attention_backend_reaches_the_refiners():
    with pytest.raises(ImportError, match="needs the xformers package"):
        LLMInfusedDiffuser(TINY_MODEL["encoders"], DIM, HEADS, backend="xformers")


@pytest.mark.parametrize("feature_norm", ["rms", "layer"])
def test_feature_norm_makes_the_refiner_blind_to_each_token_s_scale(feature_norm):
    """A massive activation (SmolLM2's first position) no longer dominates the refiner."""
    torch.manual_seed(0)
    refiner = _perturb_zero_init(LanguageTokenRefiner(24, DIM, depth=1, heads=HEADS, feature_norm=feature_norm))
    x, mask, t_emb = torch.randn(2, 5, 24), _mask([5, 3], 5), torch.randn(2, DIM)
    scaled = x.clone()
    scaled[:, 0] *= 1000.0
    torch.testing.assert_close(refiner(x, mask, t_emb), refiner(scaled, mask, t_emb), atol=1e-4, rtol=1e-4)
    plain = _perturb_zero_init(LanguageTokenRefiner(24, DIM, depth=1, heads=HEADS))
    assert (plain(x, mask, t_emb) - plain(scaled, mask, t_emb)).abs().max() > 1.0


def test_feature_norm_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="feature_norm='batch'; allowed: none, rms, layer"):
        LanguageTokenRefiner(24, DIM, feature_norm="batch")


def test_mlp_conv_mixes_a_token_with_its_grid_neighbours_only():
    torch.manual_seed(0)
    mlp, plain = Mlp(DIM, conv=True), Mlp(DIM)
    x = torch.randn(1, 4 * 6, DIM)  # a 4x6 token grid
    changed = x.clone()
    changed[0, 0] += 1.0  # token (0, 0)
    moved = (mlp(changed, (4, 6)) - mlp(x, (4, 6))).abs().amax(dim=-1).view(4, 6) > 0
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:2, :2] = True  # itself and its 3 neighbours inside the grid
    assert torch.equal(moved, expected)
    assert ((plain(changed) - plain(x)).abs().amax(dim=-1) > 0).sum() == 1
    with pytest.raises(ValueError, match="24 tokens do not form the grid"):
        mlp(x, (5, 5))


def test_rope_scores_depend_on_the_relative_offset_only():
    torch.manual_seed(0)
    h, w, head_dim = 5, 6, 16
    rope = rope_2d(h, w, head_dim)
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)
    at = lambda r, c: r * w + c  # noqa: E731  (row-major token index)
    rotated_q = apply_rope(q.expand(1, h * w, 1, head_dim), rope)[0, :, 0]  # [N, Dh]: q at every position
    rotated_k = apply_rope(k.expand(1, h * w, 1, head_dim), rope)[0, :, 0]
    score = lambda a, b: (rotated_q[at(*a)] * rotated_k[at(*b)]).sum()  # noqa: E731
    # the same offset (+1 row, +2 columns) anywhere on the grid gives the same score
    torch.testing.assert_close(score((0, 0), (1, 2)), score((3, 3), (4, 5)), atol=1e-5, rtol=0)
    torch.testing.assert_close(score((2, 1), (2, 1)), (q * k).sum(), atol=1e-5, rtol=0)  # offset 0: no rotation
    # other offsets, by row or by column, score differently
    assert (score((0, 0), (1, 2)) - score((0, 0), (2, 1))).abs() > 1e-3
    assert (score((0, 0), (0, 1)) - score((0, 0), (1, 0))).abs() > 1e-3


def test_rope_makes_self_attention_see_token_positions():
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS)
    x = torch.randn(1, 12, DIM)  # a 3x4 grid
    order = torch.randperm(12)
    plain = attn(x)
    torch.testing.assert_close(attn(x[:, order]), plain[:, order])  # without positions: permutation-equivariant
    rope = rope_2d(3, 4, DIM // HEADS)
    assert (attn(x[:, order], rope=rope) - attn(x, rope=rope)[:, order]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs self-attention"):
        attn(x, context=torch.randn(1, 5, DIM), rope=rope)
    with pytest.raises(ValueError, match="head_dim 6 is not divisible by 4"):
        rope_2d(3, 4, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        LIDiT(4, 2, 24, depth=1, heads=4, rope=True)  # head width 6


@pytest.mark.parametrize("condition", ["branch", "mean"])
def test_collaborative_branches_are_modulated_as_configured(condition):
    torch.manual_seed(0)
    diffuser = _perturb_zero_init(LLMInfusedDiffuser(TINY_MODEL["encoders"], DIM, HEADS, collab_condition=condition))
    features, masks = _text()
    t_emb = torch.randn(2, DIM)
    seen = []
    for block in diffuser.collaborative.layers[0]:
        block.adaLN.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    diffuser(features, masks, t_emb)
    refined = [r.refine(f, m, t_emb) for r, f, m in zip(diffuser.refiners, features, masks)]
    if condition == "branch":  # the paper: each branch gets its own refiner's gate input
        for c_seen, (_, c) in zip(seen, refined):
            torch.testing.assert_close(c_seen, c)
        assert (seen[0] - seen[1]).abs().max() > 1e-3
    else:
        pooled = torch.stack([masked_mean(x, m) for (x, _), m in zip(refined, masks)]).mean(dim=0)
        for c_seen in seen:
            torch.testing.assert_close(c_seen, pooled + t_emb)


def test_abs_pos_tells_each_token_its_place_in_the_image():
    table = sincos_2d(4, 6, 16)  # [N, D]
    assert table.shape == (24, 16)
    assert torch.cdist(table, table).add(torch.eye(24)).min() > 1e-2  # every token distinct
    # the same fraction of the image reads the same at any grid size: the centre column of a
    # 3-wide grid is the centre column of a 9-wide one
    torch.testing.assert_close(sincos_2d(1, 3, 16)[1], sincos_2d(1, 9, 16)[4])
    with pytest.raises(ValueError, match="divisible by 4"):
        LIDiT(4, 2, 22, depth=1, heads=2, abs_pos=True)
    # without it, the blocks see positions only through the convolutions: a grid whose tokens
    # the convolutions cannot tell apart (constant input) gives one output for all; with it, not
    outputs = {}
    for abs_pos in (False, True):
        torch.manual_seed(0)
        dit = _perturb_zero_init(LIDiT(4, 1, DIM, depth=1, heads=HEADS, abs_pos=abs_pos))
        dit.pos_embed = torch.nn.Identity()  # no convolution: no border signal
        x, cond = torch.ones(1, 4, 6, 6), torch.randn(1, 3, DIM)
        outputs[abs_pos] = dit(x, torch.tensor([500.0]), cond, torch.ones(1, 3, dtype=torch.bool))[0, :, :, :]
    assert outputs[False].std(dim=(1, 2)).max() < 1e-5
    assert outputs[True].std(dim=(1, 2)).max() > 1e-3


@pytest.mark.parametrize("conv", ["dense", "separable"])
def test_position_resblock_starts_as_identity_and_reaches_two_tokens_from_a_border(conv):
    block = ConvPositionEmbedding(DIM, conv)
    x = torch.randn(1, DIM, 7, 7)
    assert torch.equal(block(x), x)  # the residual branch's last layer is zero at init
    _perturb_zero_init(block)
    delta = (block(torch.ones(1, DIM, 7, 7)) - 1).std(dim=1)[0]  # [7, 7]: how much each token moved
    # a constant grid is told apart only through the zero padding: two 3x3 convs reach 2 tokens in
    inner = delta[2:5, 2:5]
    assert (inner - inner[1, 1]).abs().max() < 1e-5  # every token out of reach moves alike
    assert (delta[0] - delta[3, 3]).abs().min() > 1e-4  # every border token differs from the centre
    if conv == "separable":  # the MobileNet factorisation: depthwise 3x3 then pointwise 1x1
        assert block.conv1[0].groups == DIM and block.conv1[1].kernel_size == (1, 1)
        params = sum(p.numel() for p in block.parameters())
        assert params < sum(p.numel() for p in ConvPositionEmbedding(DIM).parameters()) / 4
    with pytest.raises(ValueError, match="allowed: dense, separable"):
        ConvPositionEmbedding(DIM, "depthwise")


class _Silent(torch.nn.Module):
    """An attention that adds nothing: x -> 0."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


@pytest.mark.parametrize("pooled_text", [True, False])
def test_pooled_text_switch_decides_whether_the_caption_reaches_the_modulation(pooled_text):
    torch.manual_seed(0)
    dit = _perturb_zero_init(LIDiT(4, 2, DIM, depth=2, heads=HEADS, pooled_text=pooled_text))
    assert (dit.text_pool is not None) == pooled_text
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    mask = torch.ones(1, 3, dtype=torch.bool)
    seen = []
    for block in dit.blocks:
        block.adaLN.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    captions = torch.randn(2, 1, 3, DIM)
    dit(x, t, captions[0], mask)
    t_emb = dit.timestep_embedding(t)
    if pooled_text:  # the paper: timestep + Linear(mean text token)
        torch.testing.assert_close(seen[0], t_emb + dit.text_pool(captions[0].mean(dim=1)))
    else:
        torch.testing.assert_close(seen[0], t_emb)
    # with the cross-attention silenced, the caption still moves the image only through the pooled path
    for block in dit.blocks:
        block.cross_attn = _Silent()
    moved = (dit(x, t, captions[0], mask) - dit(x, t, captions[1], mask)).abs().max()
    assert (moved > 1e-3) if pooled_text else (moved == 0)
