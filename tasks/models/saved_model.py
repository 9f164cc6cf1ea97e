"""The saved model folder: its `q3e.json` card, the settings it restores, and the
sentence-transformers / CrossEncoder files written beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tasks.config import ModelConfig
from tasks.models.prompts import DEFAULT_INSTRUCTION, RERANK_PREFIX, RERANK_SUFFIX

MODEL_CARD = "q3e.json"  # written next to every saved model: what it is and how texts are formatted


def resolve_model_config(cfg: ModelConfig | str | Path) -> ModelConfig:
    """A saved model folder carries its ModelConfig in q3e.json; anything else is a backbone spec."""
    if isinstance(cfg, ModelConfig):
        return cfg
    card = Path(cfg) / MODEL_CARD
    if card.is_file():
        data = json.loads(card.read_text())["model"]
        data["backbone"] = str(cfg)
        return ModelConfig.model_validate(data)
    return ModelConfig(backbone=str(cfg))


def weights_bytes(module: nn.Module) -> int:
    """Bytes of a module's tensors as saved (tied weights counted once)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict().values()}.values())


def _set_post_processor(path: Path, make) -> None:
    """Give the tokenizer saved in `path` the post-processor `make(backend)` builds, edited in its
    tokenizer.json with the `tokenizers` library (loading it back through transformers to change
    this one field cost 0.2 to 0.4 s a save, at every checkpoint)."""
    from tokenizers import Tokenizer

    tok_file = path / "tokenizer.json"
    backend = Tokenizer.from_file(str(tok_file))
    backend.post_processor = make(backend)
    backend.save(str(tok_file))


def write_sentence_transformers_files(path: Path, cfg: ModelConfig, hidden: int) -> None:
    """modules.json (Transformer -> last-token Pooling -> Normalize) and a tokenizer whose
    post-processor appends the end token, so ST's own tokenisation equals `Embedder.token_ids`."""
    from tokenizers import processors

    _set_post_processor(path, lambda backend: processors.TemplateProcessing(
        single=f"$A:0 {cfg.end_token}:0", pair=f"$A:0 $B:1 {cfg.end_token}:1",
        special_tokens=[(cfg.end_token, backend.token_to_id(cfg.end_token))]))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": cfg.max_doc_length, "do_lower_case": False}, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": True, "include_prompt": True,
    }, indent=2))
    (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": f"Instruct: {DEFAULT_INSTRUCTION}\nQuery:", "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine",
        **({"truncate_dim": cfg.embedding_dim} if cfg.embedding_dim else {}),
    }, indent=2))


def export_cross_encoder(causal_lm: nn.Module, tokenizer, path: Path, yes_id: int, no_id: int,
                         cfg: ModelConfig) -> Path:
    """Write the reranker as the 1-logit sequence classifier described in `Reranker.save`."""
    from tokenizers import processors
    from transformers import AutoModelForSequenceClassification

    path.mkdir(parents=True, exist_ok=True)
    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    config.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
    seq = AutoModelForSequenceClassification.from_config(config).to(causal_lm.dtype)
    seq.load_state_dict(causal_lm.state_dict(), strict=False)  # all but lm_head -> score
    head = causal_lm.get_output_embeddings().weight
    with torch.no_grad():
        seq.score.weight.copy_((head[yes_id] - head[no_id]).unsqueeze(0))
    seq.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # CrossEncoder tokenises (a, b) pairs: join them verbatim, no BOS/EOS (the template carries them)
    _set_post_processor(path, lambda backend: processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1"))
    # Without a chat template: else sentence-transformers >= 6 wraps the pair in it a second time.
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = path / "tokenizer_config.json"
    config = json.loads(tok_config.read_text(encoding="utf-8")) | {"chat_template": None}
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # as transformers writes it
    tok_config.write_text(text, encoding="utf-8")
    (path / MODEL_CARD).write_text(json.dumps({
        "kind": "cross-encoder", "prefix": RERANK_PREFIX, "suffix": RERANK_SUFFIX,
        "max_length": cfg.max_rerank_length,
        "usage": "CrossEncoder(path).predict([tasks.models.cross_encoder_pair(query, document, instruction)])",
    }, indent=2))
    return path
