"""Hugging Face ``save_pretrained`` directories as checkpoints (flatcli.io.hf).

Tiny GPT-2 (tied ``lm_head`` ↔ ``wte``), Llama (RMSNorm, rotary positions, grouped key-value
heads) and BERT sequence classifier are built offline from configs and saved into temporary
folders. The curvature products flatcli forms on the loaded model (``sdpa`` attention) are
compared, in float64, with references that share no code with flatcli: the same directory
loaded by ``transformers`` alone (torch's math attention kernel), the loss written with
``F.cross_entropy``, and ``torch.autograd`` double backward over the model's own parameters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

from flatcli.curvature.operators import make_operator  # noqa: E402
from flatcli.errors import CheckpointError, UsageError  # noqa: E402
from flatcli.io import hf  # noqa: E402
from flatcli.io.checkpoint import expand_checkpoints  # noqa: E402
from flatcli.io.load import load  # noqa: E402
from flatcli.io.spec import ModelSpec, build_model  # noqa: E402

VOCAB, T, N = 64, 8, 4
F64 = torch.float64


def write_gpt2(folder: Path, *, weights: str = "safetensors") -> Path:
    """A GPT-2 LM (1 layer, width 16, vocabulary 64) saved as ``save_pretrained`` writes it, or
    with ``weights="bin"`` as ``config.json`` + ``pytorch_model.bin`` (a ``torch.save``d state
    dict)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config)
    return _save(model, folder, weights)


def write_llama(folder: Path) -> Path:
    """A Llama LM (RMSNorm, rotary positions, 2 query heads sharing 1 key-value head)."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return _save(transformers.LlamaForCausalLM(config), folder, "safetensors")


def write_bert(folder: Path) -> Path:
    """A BERT sequence classifier over 3 classes (``pad_token_id`` 0: masked)."""
    torch.manual_seed(2)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    return _save(transformers.BertForSequenceClassification(config), folder, "safetensors")


def _save(model: nn.Module, folder: Path, weights: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "bin":
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return folder


def write_tokens(path: Path, kind: str) -> Path:
    """A ``tensors:`` file: token ids x (N, T); y the next tokens (N, T) with two positions
    not counted (-100) for an LM, or labels (N,) of 3 classes for a classifier."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, VOCAB, (N, T + 1), generator=g)
    if kind == "lm":
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        y[0, :2] = -100
    else:
        x, y = tokens[:, :-1].contiguous(), torch.tensor([0, 1, 2, 1])
        x[0, -2:] = 0  # two pad tokens
    save_file({"x": x, "y": y}, str(path))
    return path


WRITERS = {"gpt2": (write_gpt2, "lm"), "llama": (write_llama, "lm"), "bert": (write_bert, "cls")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``{name: (directory, tensors file)}`` for the three tiny models."""
    tmp = tmp_path_factory.mktemp("hf")
    return {
        name: (write(tmp / name), write_tokens(tmp / f"{name}.safetensors", kind))
        for name, (write, kind) in WRITERS.items()
    }


def _reference_model(directory: Path) -> nn.Module:
    """The directory loaded by transformers alone, eager attention, float64, eval mode."""
    kind = hf.model_kind(json.loads((directory / "config.json").read_text())["architectures"])
    auto = (
        transformers.AutoModelForCausalLM
        if kind == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    model = auto.from_pretrained(str(directory), attn_implementation="sdpa")
    return model.to(F64).eval()


@pytest.fixture(autouse=True)
def _math_attention():
    """The references run torch's math attention kernel (transformers' eager attention takes
    Llama's softmax in float32, and the fused kernels have no double backward); flatcli's
    operators pick their kernel themselves, outside this context."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _reference_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The sample loss written out: token-ce over every counted position, or ce."""
    mask = (x != model.config.pad_token_id).long() if y.dim() == 1 else None
    z = model(input_ids=x, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)


def _split(v: Tensor, shapes: dict[str, torch.Size]) -> list[Tensor]:
    out, i = [], 0
    for shape in shapes.values():
        out.append(v[i : i + shape.numel()].view(shape))
        i += shape.numel()
    return out


def _reference_hvp(model: nn.Module, x: Tensor, y: Tensor, names: list[str], v: Tensor) -> Tensor:
    """H v by double backward through the model's own parameters (tied ones once)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    g = torch.autograd.grad(_reference_loss(model, x, y), params, create_graph=True)
    vs = _split(v, {n: p.shape for n, p in zip(names, params, strict=True)})
    gv = sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True))
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(gv, params)])


def _reference_ggn_vp(
    model: nn.Module, x: Tensor, y: Tensor, names: list[str], v: Tensor
) -> Tensor:
    """G v = Jᵀ H_z J v / count: J v by the double-vjp trick, H_z the softmax cross-entropy
    Hessian diag(p) - ppᵀ of every counted position, Jᵀ by a vjp."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    mask = (x != model.config.pad_token_id).long() if y.dim() == 1 else None
    z = model(input_ids=x, attention_mask=mask, use_cache=False).logits
    u = torch.zeros_like(z, requires_grad=True)
    g = torch.autograd.grad(z, params, u, create_graph=True)
    vs = _split(v, {n: p.shape for n, p in zip(names, params, strict=True)})
    (jv,) = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True)), u)
    p = torch.softmax(z.detach(), dim=-1)
    hz = p * jv - p * (p * jv).sum(-1, keepdim=True)
    counted = (y != -100).unsqueeze(-1)
    hz = torch.where(counted, hz, torch.zeros_like(hz)) / counted.sum()
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(z, params, hz)])


def _dense_reference_hessian(model: nn.Module, x: Tensor, y: Tensor, names: list[str]) -> Tensor:
    """The Hessian block of ``names``, column by column by double backward; checked symmetric."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    g = torch.autograd.grad(_reference_loss(model, x, y), params, create_graph=True)
    flat = torch.cat([gi.reshape(-1) for gi in g])
    eye = torch.eye(len(flat), dtype=F64)
    cols = [
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat, params, e, retain_graph=True)])
        for e in eye
    ]
    H = torch.stack(cols, dim=1)
    assert float((H - H.T).abs().max()) <= 1e-12 * float(H.abs().max())
    return H


def _run(folders, name: str, **kwargs):
    directory, data = folders[name]
    return load(directory, dataset=f"tensors:{data}", dtype="float64", **kwargs)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("name", "kind", "loss", "architecture"),
    [
        ("gpt2", "causal-lm", "token-ce", "GPT2LMHeadModel"),
        ("llama", "causal-lm", "token-ce", "LlamaForCausalLM"),
        ("bert", "sequence-classifier", "ce", "BertForSequenceClassification"),
    ],
)
def test_a_directory_loads_as_its_kind_with_its_default_loss(
    folders, name, kind, loss, architecture
):
    run = _run(folders, name)
    assert run.loss == loss
    assert run.checkpoint.extra["hf"] == {"architecture": architecture, "kind": kind}
    assert run.spec.arch == f"hf:{folders[name][0].resolve()}"
    assert len(run.checkpoint.sha256) == 64
    assert not run.model.training and all(not m.training for m in run.model.modules())
    reference = _reference_model(folders[name][0])
    with torch.no_grad():
        got = run.model(run.x)
        mask = (run.x != 0).long() if kind == "sequence-classifier" else None
        want = reference(input_ids=run.x, attention_mask=mask).logits
    assert isinstance(got, Tensor)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the parameter names are the checkpoint's own; tied parameters are one, counted once
    assert [n for n, _ in run.model.named_parameters()] == [
        n for n, _ in reference.named_parameters()
    ]
    assert run.num_params == sum(p.numel() for p in reference.parameters())


def test_gpt2s_tied_head_is_one_parameter(folders):
    run = _run(folders, "gpt2")
    names = [n for n, _ in run.model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert run.model.lm_head.weight is run.model.transformer.wte.weight
    assert run.num_params == sum(p.numel() for p in run.model.parameters())


def test_the_pad_token_is_masked_for_a_classifier(folders):
    """BERT's config sets pad_token_id 0: those positions are not attended (the logits of the
    example with pads differ from an unmasked forward; the others are the same)."""
    run = _run(folders, "bert")
    reference = _reference_model(folders["bert"][0])
    with torch.no_grad():
        unmasked = reference(input_ids=run.x).logits
        got = run.model(run.x)
    padded = (run.x == 0).any(1)
    assert bool(padded.any()) and not bool(padded.all())
    torch.testing.assert_close(got[~padded], unmasked[~padded], rtol=1e-10, atol=1e-12)
    assert float((got[padded] - unmasked[padded]).abs().max()) > 1e-6


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    directory = write_gpt2(tmp_path / "bin", weights="bin")
    assert not (directory / "model.safetensors").exists()
    data = write_tokens(tmp_path / "d.safetensors", "lm")
    run = load(directory, dataset=f"tensors:{data}", dtype="float64")
    assert run.loss == "token-ce"
    with torch.no_grad():
        want = _reference_model(directory)(input_ids=run.x).logits
    torch.testing.assert_close(run.model(run.x), want, rtol=1e-10, atol=1e-12)


class _Payload:
    """Not a tensor: ``torch.load(weights_only=True)`` refuses to unpickle it."""


def test_a_bin_file_that_needs_unpickling_is_refused(tmp_path):
    directory = write_gpt2(tmp_path / "unsafe", weights="bin")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": _Payload()}, directory / "pytorch_model.bin")
    data = write_tokens(tmp_path / "d.safetensors", "lm")
    with pytest.raises(CheckpointError, match="transformers cannot load"):
        load(directory, dataset=f"tensors:{data}")


def test_config_without_weights_is_a_usage_error_naming_the_files(tmp_path):
    directory = tmp_path / "empty"
    write_gpt2(directory)
    (directory / "model.safetensors").unlink()
    for call in (lambda: expand_checkpoints([directory]), lambda: load(directory)):
        with pytest.raises(UsageError, match="model.safetensors or .*pytorch_model.bin"):
            call()


def test_without_transformers_the_error_names_the_extra(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError, match=r"needs transformers: pip install 'flatcli\[hf\]'") as e:
        expand_checkpoints([folders["gpt2"][0]])
    assert "\n" not in str(e.value) and ".[hf]" in str(e.value)


def test_a_directory_is_one_checkpoint_not_a_sweep(folders, tmp_path):
    directory = folders["gpt2"][0]
    assert expand_checkpoints([directory]) == [directory]
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    torch.save({"w": torch.zeros(1)}, sweep / "a.pt")
    assert expand_checkpoints([sweep, directory]) == [sweep / "a.pt", directory]


def test_model_option_is_refused_for_a_directory(folders):
    with pytest.raises(UsageError, match="drop --model"):
        _run(folders, "gpt2", model="mlp")


def test_weights_that_do_not_fit_the_architecture_list_the_keys(tmp_path):
    """A base model's weights (no classifier head) read as a sequence classifier."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16,
    )  # fmt: skip
    directory = _save(transformers.BertModel(config), tmp_path / "base", "safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \[classifier.bias"):
        hf.load_pretrained(directory)


def test_the_offline_switch_is_on_while_loading_and_restored_after(folders, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE
    seen = []
    original = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append((constants.is_offline_mode(), kwargs.get("local_files_only")))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    hf.load_pretrained(folders["gpt2"][0])
    assert seen == [(True, True)]
    assert constants.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in os.environ


def test_the_recorded_spec_builds_the_architecture_with_fresh_weights(folders):
    run = _run(folders, "llama")
    fresh = build_model(ModelSpec(arch=run.spec.arch))
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [
        (n, p.shape) for n, p in run.model.named_parameters()
    ]
    assert isinstance(fresh(run.x[:1]), Tensor)
    with pytest.raises(UsageError, match="not a Hugging Face directory"):
        build_model(ModelSpec(arch="hf:/nonexistent/dir"))


def test_a_text_dataset_is_tokenised_with_the_directorys_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    directory = write_gpt2(tmp_path / "lm")
    words = "the cat sat on the mat and the dog sat on the log".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab["[UNK]"] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(words * 4))
    run = load(directory, dataset=f"text:{text}", seq_len=5, dtype="float64")
    ids = torch.tensor(tok.encode(" ".join(words * 4)).ids)
    assert run.loss == "token-ce" and tuple(run.x.shape[1:]) == (5,)
    first = run.dataset.train.x[0], run.dataset.train.y[0]
    assert first[0].tolist() == ids[:5].tolist() and first[1].tolist() == ids[1:6].tolist()


# --------------------------------------------------------------------------- curvature


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_products_match_autograd_through_the_loaded_model(folders, name, kind):
    """H v and G v over every parameter (GPT-2's tied embedding included) against double
    backward through the model transformers loads by itself."""
    run = _run(folders, name)
    op = make_operator(kind, run.model, run.x, run.y, loss_fn=run.loss)
    reference = _reference_model(folders[name][0])
    names = list(op.param_names)
    assert names == [n for n, _ in reference.named_parameters()]
    product = _reference_hvp if kind == "hessian" else _reference_ggn_vp
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        v = torch.randn(op.dim, generator=g, dtype=F64)
        want = product(reference, run.x, run.y, names, v)
        got = op @ v
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


@pytest.mark.parametrize(
    ("name", "block"),
    [("gpt2", "transformer.ln_f"), ("llama", "model.norm"), ("bert", "classifier")],
)
def test_a_dense_hessian_block_matches_double_backward(folders, name, block):
    run = _run(folders, name)
    op = make_operator("hessian", run.model, run.x, run.y, loss_fn=run.loss, params=block)
    reference = _reference_model(folders[name][0])
    H = _dense_reference_hessian(reference, run.x, run.y, list(op.param_names))
    got = op.to_dense()
    assert float((got - H).abs().max()) <= 1e-10 * float(H.abs().max())


def test_sdpa_attention_falls_back_to_the_math_kernel_when_needed(folders):
    """HF's sdpa path runs torch's scaled_dot_product_attention; a product that a fused
    kernel cannot take is formed on the math kernel, and the operator says so."""
    run = _run(folders, "gpt2")
    op = make_operator("hessian", run.model, run.x, run.y, loss_fn="token-ce")
    info = op.describe()
    assert info["attention_kernel"] in ("default", "math")
    if info["attention_kernel"] == "math":
        assert "math kernel" in op.fallback_reason
