"""PromptEncoder: features equal a plain transformers forward; the prefix is shared exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, T5EncoderModel

from embed.encoder import EncoderError, PromptEncoder
from store.config import EncoderConfig

CAPTIONS = [
    "a red circle",
    "a large green square to the left of a small blue triangle",
    'two "quoted" 3 shapes\nwith a newline, émoji 🟥 and 中文',
]


def causal(path, **kw) -> EncoderConfig:
    kw.setdefault("compute_dtype", "float32")
    kw.setdefault("store_dtype", "float32")
    return EncoderConfig(name="llm", path=str(path), kind="causal", **kw)


def plain_hidden_states(path, ids: list[int], layer: int) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_dir"])
@pytest.mark.parametrize("layer", [-3, -2])
def test_causal_features_equal_plain_forward_of_prefix_and_caption(fixture, layer, request):
    path = request.getfixturevalue(fixture)
    enc = PromptEncoder(causal(path, layer=layer))
    for caption, out in zip(CAPTIONS, enc.encode(CAPTIONS, batch_size=2)):
        reference = plain_hidden_states(path, enc.prefix_ids + out.ids.tolist(), layer)
        p = len(enc.prefix_ids)
        assert torch.allclose(out.states, reference[p:], atol=1e-5), caption
        assert torch.allclose(enc.prefix_states, reference[:p], atol=1e-5)


def block_outputs(model, ids: list[int]) -> list[torch.Tensor]:
    """The raw output of every transformer block in a plain forward, caught with hooks."""
    inner = getattr(model, "model", model)
    blocks = inner.language_model.layers if hasattr(inner, "language_model") else \
        inner.layers if hasattr(inner, "layers") else model.encoder.block
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return [o[0] for o in outputs]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3-multimodal"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_decoder_family_equals_the_raw_block_output_of_a_plain_forward(arch, family_dir):
    """Layer -3 and -1 (the final norm excluded) against hooks on a plain full forward. Mistral,
    Gemma 2 and Gemma 3 have a sliding window of 8, shorter than the shared prefix."""
    path = family_dir(arch)
    full_cls = AutoModelForImageTextToText if arch == "gemma3-multimodal" else AutoModelForCausalLM
    full = full_cls.from_pretrained(path, dtype=torch.float32).eval()
    for layer in (-3, -1):
        enc = PromptEncoder(causal(path, layer=layer))
        p = len(enc.prefix_ids)
        assert p > 8
        for caption, out in zip(CAPTIONS, enc.encode(CAPTIONS, batch_size=3)):
            reference = block_outputs(full, enc.prefix_ids + out.ids.tolist())[layer]
            torch.testing.assert_close(out.states, reference[p:], rtol=1e-4, atol=1e-5, msg=f"{arch} {layer} {caption}")
            torch.testing.assert_close(enc.prefix_states, reference[:p], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_final_norm_at_the_last_layer_equals_the_models_last_hidden_state(arch, family_dir):
    path = family_dir(arch)
    enc = PromptEncoder(causal(path, layer=-1, final_norm=True))
    out = enc.encode(["a red circle"])[0]
    reference = plain_hidden_states(path, enc.prefix_ids + out.ids.tolist(), -1)  # transformers: after the norm
    torch.testing.assert_close(out.states, reference[len(enc.prefix_ids):], rtol=1e-4, atol=1e-5)
    with pytest.raises(EncoderError, match="final_norm applies only to the last layer"):
        PromptEncoder(causal(path, layer=-3, final_norm=True))


def t5_config(path, **kw) -> EncoderConfig:
    return EncoderConfig(name="t5", path=str(path), kind="bidirectional", instruction=None,
                         compute_dtype="float32", store_dtype="float32", **kw)


def test_t5_encoder_features_equal_a_plain_forward_of_its_encoder(t5_dir):
    """A full T5 checkpoint loads its encoder only; block 0's relative position bias still
    reaches the later blocks after truncation; -1 with final_norm is PixArt's feature."""
    plain = T5EncoderModel.from_pretrained(t5_dir, dtype=torch.float32).eval()
    for layer, final_norm in ((-2, False), (-1, False), (-1, True)):
        enc = PromptEncoder(t5_config(t5_dir, layer=layer, final_norm=final_norm))
        assert type(enc.model).__name__ == "T5EncoderModel" and enc.num_blocks == 3
        for out in enc.encode(CAPTIONS, batch_size=3):
            ids = out.ids.tolist()
            assert ids[-1] == enc.tokenizer.eos_token_id and enc.tokenizer.eos_token_id not in ids[:-1]
            if final_norm:
                with torch.no_grad():
                    reference = plain(torch.tensor([ids])).last_hidden_state[0]
            else:
                reference = block_outputs(plain, ids)[layer]
            torch.testing.assert_close(out.states, reference, rtol=1e-4, atol=1e-5)


def test_t5_truncation_keeps_its_closing_eos_and_counts_one_special_token(t5_dir):
    enc = PromptEncoder(t5_config(t5_dir, layer=-1, max_tokens=4))
    short, long = enc.encode(["red", "a large green square to the left of a small blue triangle"])
    assert not short.truncated
    assert long.truncated and len(long.ids) == 5 and long.ids[-1] == enc.tokenizer.eos_token_id
    with pytest.raises(EncoderError, match="kind 'causal' but T5EncoderModel is not a decoder"):
        PromptEncoder(causal(t5_dir))


def test_shared_prefix_equals_prefix_positions_of_different_full_forwards(llama_dir):
    enc = PromptEncoder(causal(llama_dir))
    p = len(enc.prefix_ids)
    for caption in CAPTIONS:
        full = plain_hidden_states(llama_dir, enc.prefix_ids + enc.tokenize(caption)[0], -3)
        assert torch.allclose(full[:p], enc.prefix_states, atol=1e-5)


def test_bos_is_added_once_at_the_start_only(llama_dir):
    enc = PromptEncoder(causal(llama_dir))
    bos = enc.tokenizer.bos_token_id
    ids, _ = enc.tokenize("a red circle")
    assert enc.prefix_ids[0] == bos and bos not in ids


def test_bf16_storage_is_within_bf16_rounding_of_fp32(llama_dir):
    exact = PromptEncoder(causal(llama_dir)).encode(CAPTIONS)
    stored = PromptEncoder(causal(llama_dir, store_dtype="bfloat16")).encode(CAPTIONS)
    for a, b in zip(exact, stored):
        assert b.states.dtype == torch.bfloat16
        assert torch.allclose(b.states.float(), a.states, rtol=2**-8, atol=1e-6)


def test_bidirectional_features_equal_plain_forward(bert_dir):
    config = EncoderConfig(name="bert", path=str(bert_dir), kind="bidirectional", layer=-1,
                           instruction=None, compute_dtype="float32", store_dtype="float32")
    enc = PromptEncoder(config)
    model = AutoModel.from_pretrained(bert_dir, dtype=torch.float32).eval()
    assert enc.prefix_ids == []
    for out in enc.encode(CAPTIONS):
        with torch.no_grad():
            reference = model(torch.tensor([out.ids.tolist()]), output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(out.states, reference, atol=1e-5)


def test_long_caption_is_truncated_and_flagged(llama_dir):
    enc = PromptEncoder(causal(llama_dir, max_tokens=5))
    short, long = enc.encode(["red", "a large green square to the left of a small blue triangle"])
    assert not short.truncated
    assert long.truncated and len(long.ids) == 5


def test_chat_template_prefix_and_suffix_equal_plain_forward(llama_dir):
    enc = PromptEncoder(causal(llama_dir, chat_template=True))
    assert enc.suffix_ids, "the template closes the user turn after the caption"
    out = enc.encode(["a blue square"])[0]
    assert out.ids.tolist()[-len(enc.suffix_ids):] == enc.suffix_ids
    reference = plain_hidden_states(llama_dir, enc.prefix_ids + out.ids.tolist(), -3)
    assert torch.allclose(out.states, reference[len(enc.prefix_ids):], atol=1e-5)


def test_system_prompt_and_dropped_suffix_end_the_condition_at_the_caption(llama_dir):
    enc = PromptEncoder(causal(llama_dir, chat_template=True, system_prompt="You describe pictures.",
                               template_suffix="drop"))
    assert enc.suffix_ids == []
    prefix = enc.tokenizer.decode(enc.prefix_ids)
    assert prefix.startswith("<s>system\nYou describe pictures.</s>") and prefix.endswith("objects:")
    out = enc.encode(["a blue square"])[0]
    assert enc.tokenizer.decode(out.ids.tolist()) == " a blue square"
    reference = plain_hidden_states(llama_dir, enc.prefix_ids + out.ids.tolist(), -3)
    assert torch.allclose(out.states, reference[len(enc.prefix_ids):], atol=1e-5)


def test_system_prompt_without_the_chat_template_is_refused():
    from store.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="set chat_template: true"):
        load_config("configs/default.yaml", ["encoders=[{name: a, path: x, system_prompt: hi}]"])


def test_layer_out_of_range_is_a_clear_error(llama_dir):
    with pytest.raises(EncoderError, match="layer -9 is out of range for a model with 4 blocks"):
        PromptEncoder(causal(llama_dir, layer=-9))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        PromptEncoder(causal(tmp_path / "nope"))


def test_empty_caption_is_the_unconditional_text(llama_dir, bert_dir):
    """Causal: no caption tokens at all, so the unconditional text is the instruction alone.
    Bidirectional: the special tokens only, encoded like any caption."""
    enc = PromptEncoder(causal(llama_dir))
    null = enc.null_caption()
    assert null.states.shape == (0, enc.hidden_size) and len(null.ids) == 0 and not null.truncated
    assert enc.encode(["", "a red circle"])[0].states.shape[0] == 0  # also inside a batch
    bert = PromptEncoder(EncoderConfig(name="bert", path=str(bert_dir), kind="bidirectional", layer=-1,
                                       instruction=None, compute_dtype="float32", store_dtype="float32"))
    special = bert.null_caption()
    assert special.ids.tolist() == [bert.tokenizer.cls_token_id, bert.tokenizer.sep_token_id]
    plain = AutoModel.from_pretrained(bert_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = plain(torch.tensor([special.ids.tolist()]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(special.states, reference, rtol=1e-4, atol=1e-5)


def test_prefix_and_caption_ids_equal_a_joint_tokenisation_with_the_real_smollm2_tokenizer():
    """The reference is the tokenizer run on the whole instructed text, not the encoder's ids."""
    from store.config import PAPER_INSTRUCTION

    encoder = PromptEncoder(EncoderConfig(name="smollm2", path="embedded:smollm2", compute_dtype="float32"))
    captions = CAPTIONS + ["3 circles: 1 red, 2 blue", "  leading spaces", "ends with a colon:", "it's a 'shape'",
                           "tabs\tand\u00a0no-break spaces", "\u65e5\u672c\u8a9e\u306e\u6587"]
    for caption in captions:
        joint = encoder.tokenizer(f"{PAPER_INSTRUCTION} {caption}")["input_ids"]
        ids, truncated = encoder.tokenize(caption)
        assert not truncated
        assert encoder.prefix_ids + ids == joint, caption


def test_weights_other_than_the_caches_are_refused_before_loading(llama_dir):
    with pytest.raises(EncoderError, match="the features were made with hash 0000000000000000"):
        PromptEncoder(causal(llama_dir), expect_hash="0" * 16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_encoder_compute_dtype_runs_on_any_cpu_and_stays_near_fp32(llama_dir, dtype):
    """encoders[].compute_dtype is picked by the hardware under auto; each value is run here by name."""
    reference = PromptEncoder(causal(llama_dir)).encode(CAPTIONS[:2], batch_size=2)
    enc = PromptEncoder(causal(llama_dir, compute_dtype=dtype))
    assert enc.compute_dtype_name == dtype
    tolerance = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}[dtype]
    for out, ref in zip(enc.encode(CAPTIONS[:2], batch_size=2), reference):
        assert list(out.ids) == list(ref.ids)
        error = (out.states.float() - ref.states).norm() / ref.states.norm()
        assert torch.isfinite(out.states).all() and error < tolerance, (dtype, float(error))
