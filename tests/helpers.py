"""Tiny models for tests, built from configs (no downloads)."""

import torch


def bert_classifier(tmp_path, hidden=768, layers=2, heads=12, ffn=3072, vocab=1000, labels=2, name="bert", init_range=0.02,
                    dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=64, num_labels=labels, initializer_range=init_range,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
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


def wordpiece_tokenizer(path, words):
    """A small BERT-style WordPiece tokenizer saved to ``path`` (offline, no downloads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words))}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(path)
    return len(vocab)


POS = ["good", "great", "fine", "warm", "funny", "wise", "charming", "clever", "delight", "best"]
NEG = ["bad", "dull", "flat", "thin", "tedious", "mess", "boring", "worst", "awful", "weak"]
NEU = ["the", "a", "film", "plot", "movie", "story", "is", "and", "was", "very"]


def sentiment_task(root, n_train=192, n_dev=48, seed=0, name="SST-2"):
    """A learnable SST-2-format task: label 1 when a sentence has more positive than negative words."""
    import random

    rng = random.Random(seed)
    task = root / name
    task.mkdir(parents=True, exist_ok=True)

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            k = rng.randint(1, 3)
            words = rng.sample(POS if label else NEG, k) + rng.sample(NEG if label else POS, k - 1) + rng.sample(NEU, rng.randint(1, 4))
            rng.shuffle(words)
            out.append(f"{' '.join(words)}\t{label}")
        return out

    (task / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(n_train)) + "\n")
    (task / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(n_dev)) + "\n")
    return task


def tiny_pair(root, hidden=32, teacher_layers=4, heads=4, ffn=64, dropout=0.1, name="teacher"):
    """A tiny teacher (HF directory with tokenizer) on the sentiment vocabulary."""
    words = set(POS + NEG + NEU)
    _, tdir = bert_classifier(root, hidden=hidden, layers=teacher_layers, heads=heads, ffn=ffn, vocab=40, name=name,
                              dropout=dropout)
    wordpiece_tokenizer(tdir, words)
    return tdir


def run_cli(args, capsys):
    """Run the tdkd CLI in-process: (exit code, stdout, stderr)."""
    import pytest

    from tdkd_cli.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


VIT_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


def digits_folder(root, count=40, dev_from=None):
    """Real 8x8 digit images (scikit-learn's bundled set) as an image folder ROOT/[split/]CLASS/i.png;
    with ``dev_from`` images from that index on go to dev/, the rest to train/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        split = "" if dev_from is None else ("train" if i < dev_from else "dev")
        cls = root / split / str(digits.target[i])
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).convert("RGB").save(cls / f"{i}.png")
    return root


def tiny_vit_dir(path, num_classes=10):
    """A tiny timm ViT (32x32 input) saved as a tdkd timm directory: config.json + model.safetensors."""
    import json

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **VIT_ARGS).eval()
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": num_classes,
                                                  "model_args": VIT_ARGS}))
    return model, path
