"""Embedding model and reranker mechanics (SPEC 1) on the micro model, plus the bundled SmolLM2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config import LoraConfig, ModelConfig
from tasks.models import (
    RERANK_PREFIX, RERANK_SUFFIX, Embedder, ModelLoadError, Reranker, bundled_path,
    cross_encoder_pair, format_query, last_token_pool, pad_left, resolve_backbone,
)

TEXTS = ["what is the capital of france", "Paris is the capital and most populous city of France.",
         "a b", "The quick brown fox jumps over the lazy dog near the river bank at dawn."]


def test_query_format_is_the_papers():
    assert format_query("how tall", "Find it") == "Instruct: Find it\nQuery:how tall"
    assert format_query("how tall", None) == "how tall"


def test_end_token_appended_once_and_kept_under_truncation(micro_embedder):
    e = micro_embedder
    ids = e.token_ids(["hello world", "hello world<|endoftext|>", "x " * 100], 8)
    assert ids[0][-1] == e.end_id and ids[0].count(e.end_id) == 1
    assert ids[1] == ids[0]  # already ending with the end token: not doubled
    assert len(ids[2]) == 8 and ids[2][-1] == e.end_id


def test_last_token_pool_left_and_right_padding_agree():
    h = torch.randn(2, 5, 3)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(last_token_pool(h, left), h[:, -1])
    assert torch.equal(last_token_pool(h, right)[0], h[0, 2])
    assert torch.equal(last_token_pool(h, right)[1], h[1, 4])


def test_encode_is_normalised_and_batch_independent(micro_embedder):
    e = micro_embedder
    batched = e.encode(TEXTS, batch_size=4)
    single = np.concatenate([e.encode([t]) for t in TEXTS])
    assert np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    assert np.allclose(batched, single, atol=1e-5)  # left padding does not change an embedding


def test_embedding_is_the_end_token_hidden_state(micro_embedder):
    e = micro_embedder
    ids = e.token_ids(["hello world"], 16)[0]
    with torch.no_grad():
        h = e.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    assert np.allclose(e.encode(["hello world"])[0], F.normalize(h, dim=-1).numpy(), atol=1e-5)


def test_mrl_truncation_renormalises(micro_embedder):
    full = micro_embedder.encode(TEXTS)
    short = micro_embedder.encode(TEXTS, dim=16)
    assert short.shape == (4, 16)
    ref = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert np.allclose(short, ref, atol=1e-5)
    with pytest.raises(ValueError, match="larger than the model"):
        micro_embedder.encode(TEXTS, dim=10_000)


def test_instruction_only_changes_queries(micro_embedder):
    e = micro_embedder
    q = e.encode(["capital of france"], instruction="Find the city", is_query=True)
    raw = e.encode([format_query("capital of france", "Find the city")], is_query=True)
    assert np.allclose(q, raw, atol=1e-6)
    assert not np.allclose(q, e.encode(["capital of france"]), atol=1e-3)


def test_sentence_transformers_export_gives_the_same_embeddings(micro_embedder, tmp_path):
    from sentence_transformers import SentenceTransformer

    path = micro_embedder.save(tmp_path / "emb")
    st = SentenceTransformer(str(path), device="cpu")
    ours = micro_embedder.encode(TEXTS, batch_size=4)
    theirs = st.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    assert np.allclose(ours, theirs, atol=1e-5)
    q_ours = micro_embedder.encode(TEXTS[:1], instruction=json.loads(
        (path / "config_sentence_transformers.json").read_text())["prompts"]["query"][len("Instruct: "):-len("\nQuery:")],
        is_query=True, max_length=micro_embedder.cfg.max_doc_length)
    q_theirs = st.encode(TEXTS[:1], prompt_name="query", convert_to_numpy=True)
    assert np.allclose(q_ours, q_theirs, atol=1e-5)
    # and our own loader reads the export back with identical weights
    again = Embedder.load(str(path), device="cpu")
    assert np.allclose(again.encode(TEXTS), ours, atol=1e-6)


def test_reranker_prompt_is_the_papers_template(micro_reranker):
    r = micro_reranker
    ids = r.token_ids(["who wrote it"], ["Shakespeare wrote it."], "Judge relevance")[0]
    text = r.tokenizer.decode(ids)
    assert text == (f"{RERANK_PREFIX}<Instruct>: Judge relevance\n<Query>: who wrote it\n"
                    f"<Document>: Shakespeare wrote it.{RERANK_SUFFIX}")
    assert RERANK_SUFFIX.endswith("<think>\n\n</think>\n\n")


def test_reranker_truncates_only_the_body(micro_reranker):
    r = micro_reranker
    ids = r.token_ids(["q"], ["word " * 2000], None, max_length=100)[0]
    assert len(ids) == 100
    assert ids[: len(r.prefix_ids)] == r.prefix_ids and ids[-len(r.suffix_ids):] == r.suffix_ids


def test_reranker_score_is_yes_no_softmax_at_last_position(micro_reranker):
    r = micro_reranker
    ids = r.token_ids(["q one", "a longer query two"], ["doc", "another document here"])
    scores = r.score(["q one", "a longer query two"], ["doc", "another document here"])
    for i, s in enumerate(ids):
        with torch.no_grad():
            logits = r.backbone(input_ids=torch.tensor([s])).logits[0, -1]
        ref = torch.softmax(torch.stack([logits[r.yes_id], logits[r.no_id]]), 0)[0]
        assert abs(float(ref) - scores[i]) < 1e-5
    assert ((scores > 0) & (scores < 1)).all()


def test_the_shared_rerank_prefix_gives_the_full_passs_logits_and_gradients(micro_cfg):
    """model.share_rerank_prefix runs the template's prefix once and the batch attends to its keys and
    values: the logits and the SFT loss's gradients of the full left-padded pass, to float rounding."""
    from tasks.losses import reranker_sft_loss

    full, shared = (Reranker.load(micro_cfg.model.model_copy(update={"share_rerank_prefix": on}), device="cpu")
                    for on in (False, True))
    qs = ["q one", "a longer query two with more words", "q3"]
    ds = ["doc", "another document here " * 6, "a third text, of middling length"]
    input_ids, mask = pad_left(shared.token_ids(qs, ds, "Judge relevance"), shared.pad_id, "cpu")
    body, body_mask = shared._split_prefix(input_ids, mask)
    assert body.shape[1] == input_ids.shape[1] - len(shared.prefix_ids)  # the shared path really runs
    assert torch.equal(body_mask.sum(1), mask.sum(1) - len(shared.prefix_ids))
    grads = []
    for model in (full, shared):
        model.zero_grad()
        logits = model(input_ids, mask)
        reranker_sft_loss(logits, torch.tensor([1, 0, 1]), model.yes_id, model.no_id).backward()
        grads.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (l_full, g_full), (l_shared, g_shared) = grads
    assert torch.allclose(l_full, l_shared, atol=1e-5)
    assert g_full.shape == g_shared.shape and float((g_full - g_shared).norm() / g_full.norm()) < 1e-5
    assert np.allclose(full.score(qs, ds), shared.score(qs, ds), atol=1e-6)
    # a batch whose rows do not all start with the prefix takes the full pass
    other, other_mask = pad_left([shared.prefix_ids + [5, 6, 7], [5, 6] + shared.prefix_ids], shared.pad_id, "cpu")
    assert shared._split_prefix(other, other_mask) is None
    with torch.no_grad():
        assert torch.allclose(shared(other, other_mask), full(other, other_mask), atol=1e-6)


def test_cross_encoder_export_gives_the_same_scores(micro_reranker, tmp_path):
    from sentence_transformers import CrossEncoder

    path = micro_reranker.save(tmp_path / "rr")
    qs, ds = ["who wrote hamlet", "capital of france"], ["Shakespeare wrote Hamlet.", "Berlin is in Germany."]
    ours = micro_reranker.score(qs, ds)
    ce = CrossEncoder(str(path / "cross-encoder"), device="cpu")
    theirs = ce.predict([cross_encoder_pair(q, d) for q, d in zip(qs, ds)])
    assert np.allclose(ours, np.asarray(theirs), atol=1e-5)
    again = Reranker.load(str(path), device="cpu")
    assert np.allclose(again.score(qs, ds), ours, atol=1e-6)


def test_lora_trains_only_adapters_and_saves_merged(micro_cfg, tmp_path):
    e = Embedder.load(micro_cfg.model, device="cpu", lora=LoraConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in e.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-zero so merging matters
        for n, p in e.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = e.encode(TEXTS)
    path = e.save(tmp_path / "lora")
    merged = Embedder.load(str(path), device="cpu")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert np.allclose(merged.encode(TEXTS), before, atol=1e-5)


def test_pad_left():
    ids, mask = pad_left([[5, 6], [7]], 0, "cpu")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_backbone(ModelConfig(backbone=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_backbone(ModelConfig(backbone=str(tmp_path / "empty")))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_backbone(ModelConfig(backbone=str(fake)))
    assert resolve_backbone(ModelConfig(backbone="Qwen/Qwen3-Embedding-0.6B")) == "Qwen/Qwen3-Embedding-0.6B"


def test_hub_loading_code_path_on_a_local_folder(micro_embedder, tmp_path):
    """The from_pretrained path hub users take, pointed at a local HF folder (no hub here)."""
    from transformers import AutoModel

    micro_embedder.backbone.save_pretrained(tmp_path / "plain")
    micro_embedder.tokenizer.save_pretrained(tmp_path / "plain")
    e = Embedder.load(ModelConfig(backbone=str(tmp_path / "plain")), device="cpu")
    assert isinstance(e.backbone, type(AutoModel.from_pretrained(str(tmp_path / "plain"))))
    assert np.allclose(e.encode(TEXTS), micro_embedder.encode(TEXTS), atol=1e-6)


def test_bundled_smollm2_has_the_chatml_and_yes_no_tokens():
    folder, gguf = bundled_path("smollm2")
    assert (folder / gguf).is_file()
    r = Reranker.load(ModelConfig(backbone="bundled:smollm2"), device="cpu")
    tok = r.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert r.yes_id != r.no_id
    assert sum(p.numel() for p in r.backbone.parameters()) > 100_000_000
    s = r.score(["what color is the sky"], ["The sky is blue on a clear day."])
    assert 0 < s[0] < 1


def test_a_damaged_weights_file_is_named(micro_cfg, tmp_path):
    """merge / encode / eval on a truncated model.safetensors: one line naming the file."""
    import os

    folder = Embedder.load(micro_cfg.model, device="cpu").save(tmp_path / "m")
    os.truncate(folder / "model.safetensors", 1000)
    with pytest.raises(ModelLoadError, match=r"m/model.safetensors: damaged weights file"):
        Embedder.load(str(folder))


def _linear_output_dtypes(model, run) -> set[torch.dtype]:
    """dtypes of every decoder MLP projection's output while `run()` runs."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.add(o.dtype))
             for n, m in model.backbone.named_modules() if n.endswith("mlp.down_proj")]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_autocast_runs_the_decoder_in_bf16_and_keeps_the_embedding_float32(micro_cfg, micro_embedder, tmp_path):
    mixed = Embedder.load(micro_cfg.model.model_copy(update={"autocast": "bfloat16"}), device="cpu")
    assert _linear_output_dtypes(micro_embedder, lambda: micro_embedder.encode(TEXTS)) == {torch.float32}
    assert _linear_output_dtypes(mixed, lambda: mixed.encode(TEXTS)) == {torch.bfloat16}
    ref, out = micro_embedder.encode(TEXTS), mixed.encode(TEXTS)
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    cos = (ref * out).sum(1)
    assert (cos > 0.99).all() and not np.array_equal(ref, out), cos  # bf16 products: close, not equal
    # the setting travels with the saved model, so evaluation encodes as training did
    again = Embedder.load(str(mixed.save(tmp_path / "mixed")), device="cpu")
    assert again.cfg.autocast == "bfloat16" and np.array_equal(again.encode(TEXTS), out)


def test_autocast_reranker_reads_yes_no_from_a_float32_head(micro_cfg, micro_reranker):
    mixed = Reranker.load(micro_cfg.model.model_copy(update={"autocast": "bfloat16"}), device="cpu")
    qs, ds = ["q one", "a longer query two", "q three"], ["doc", "another document here", "a third text"]
    assert _linear_output_dtypes(mixed, lambda: mixed.score(qs, ds)) == {torch.bfloat16}
    input_ids, mask = pad_left(mixed.token_ids(qs, ds), mixed.pad_id, "cpu")
    with torch.no_grad():
        logits = mixed(input_ids, mask)
    # a bf16 head would round logits to 8 bits of mantissa, and near scores would tie
    assert logits.dtype == torch.float32 and not torch.equal(logits, logits.bfloat16().float())
    assert np.allclose(mixed.score(qs, ds), micro_reranker.score(qs, ds), atol=5e-3)


def test_autocast_auto_is_bf16_only_where_the_device_has_it_natively(micro_cfg, monkeypatch):
    from tasks.models import backbone

    for native in (True, False):
        monkeypatch.setattr(backbone, "native_bf16", lambda device, native=native: native)
        model = Embedder.load(micro_cfg.model.model_copy(update={"autocast": "auto"}), device="cpu")
        assert model.cfg.autocast == ("bfloat16" if native else None)  # the card says what it ran with
        assert backbone.resolve_autocast("auto", "cpu") == model.cfg.autocast
        assert backbone.resolve_autocast("float16", "cpu") == "float16" and backbone.resolve_autocast(None, "cpu") is None
