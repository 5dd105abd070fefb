"""Tiny models for tests, built from configs (no downloads)."""

import torch


def bert_classifier(tmp_path, hidden=768, layers=2, heads=12, ffn=3072, vocab=1000, labels=2, name="bert"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=64, num_labels=labels)
    model = BertForSequenceClassification(cfg).eval()
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def vit_tiny(tmp_path, name="vit.safetensors"):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def rel_fro(a, b):
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / max(float(torch.linalg.norm(b)), 1e-30))
