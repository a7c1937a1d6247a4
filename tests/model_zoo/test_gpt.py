"""The zoo's language models (``gpt-tiny``, ``gpt-small``): shapes, causality, the tied head, and
the registry-wide promises (backward, round trip, torch.func) on token inputs."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import model_zoo
from model_zoo.gpt import GPT, GPTConfig

from .shapes import LANGUAGE_MODELS, tokens


def build(name: str, seed: int = 0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return model_zoo.get_model(name, **kwargs)


def test_the_language_models_are_registered() -> None:
    assert LANGUAGE_MODELS == ["gpt-small", "gpt-tiny"]
    tiny = build("gpt-tiny").config
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.vocab_size, tiny.block_size) == (
        2,
        64,
        4,
        256,
        128,
    )
    small = build("gpt-small").config
    assert (small.n_layer, small.n_embd, small.n_head) == (4, 128, 4)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_logits_have_shape_n_t_v(name: str) -> None:
    model = build(name, num_classes=50).eval()
    with torch.no_grad():
        out = model(tokens(3, 11, vocab=50))
    assert out.shape == (3, 11, 50) and torch.isfinite(out).all()


def test_block_size_follows_the_data_and_longer_sequences_are_refused() -> None:
    model = model_zoo.get_model("gpt-tiny", input_shape=[16])
    assert model.config.block_size == 16 and model.pos_emb.weight.shape == (16, 64)
    assert model_zoo.get_model("gpt-tiny", input_shape=[16], block_size=40).config.block_size == 40
    with pytest.raises(ValueError, match="block_size=16 tokens; got T=17"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match="integer token ids of shape"):
        model(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="input_shape must be"):
        model_zoo.get_model("gpt-tiny", input_shape=[1, 28, 28])
    with pytest.raises(ValueError, match="multiple of n_head"):
        model_zoo.get_model("gpt-tiny", n_embd=30)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_causal_changing_token_t_leaves_earlier_logits_unchanged(name: str) -> None:
    model = build(name).double().eval()
    x = tokens(2, 12)
    t = 7
    changed = x.clone()
    changed[:, t] = (x[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])  # positions before t never see token t
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-8  # t and later do
    # the same through the gradient: logits at t - 1 do not depend on the embedding of token t
    emb = model.tok_emb(x).detach().requires_grad_(True)
    h = emb + model.pos_emb(torch.arange(12))
    for block in model.blocks:
        h = block(h)
    logits = F.linear(model.ln_f(h), model.tok_emb.weight)
    (g,) = torch.autograd.grad(logits[:, t - 1].sum(), emb)
    assert torch.equal(g[:, t:], torch.zeros_like(g[:, t:])) and g[:, : t - 1].abs().sum() > 0
    torch.testing.assert_close(logits, a)


def test_head_is_tied_to_the_token_embedding() -> None:
    model = build("gpt-tiny").eval()
    keys = list(model.state_dict())
    assert "tok_emb.weight" in keys and not any("head" in k for k in keys)
    x = tokens(2, 5)
    with torch.no_grad():
        logits = model(x)
        h = model.tok_emb(x) + model.pos_emb(torch.arange(5))
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(logits, model.ln_f(h) @ model.tok_emb.weight.T)
        model.tok_emb.weight[3].zero_()  # the one matrix is both: zeroing row 3 zeroes logit 3
        assert torch.equal(model(x)[..., 3], torch.zeros(2, 5))
    # the loss reaches the embedding both as input and as head
    model.train()
    F.cross_entropy(model(x).reshape(-1, 256), tokens(2, 5, seed=1).reshape(-1)).backward()
    unused = sorted(set(range(256)) - set(x.flatten().tolist()))[0]
    assert model.tok_emb.weight.grad[unused].abs().sum() > 0  # a token not in the input: head


def test_attention_is_the_causal_softmax_of_the_definition() -> None:
    """One block's attention written out: softmax(QK^T / sqrt(hs) + causal mask) V per head."""
    config = GPTConfig(vocab_size=20, block_size=6, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    model = GPT(config).double().eval()
    attn = model.blocks[0].attn
    h = torch.randn(3, 6, 8, dtype=torch.float64)
    q, k, v = attn.qkv(h).split(8, dim=-1)
    out = []
    for head in range(2):
        sl = slice(4 * head, 4 * head + 4)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4)
        mask = torch.ones(6, 6, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        out.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    expected = attn.out(torch.cat(out, dim=-1))
    torch.testing.assert_close(attn(h), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = build(name).train()
    x, y = tokens(2, 8), tokens(2, 8, seed=1)
    F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_state_dict_round_trip(name: str) -> None:
    a = build(name, seed=0).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build(name, seed=1)
    b.load_state_dict(torch.load(buf, weights_only=True))
    b.eval()
    x = tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap fallback
@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_torch_func_per_example_gradients(name: str) -> None:
    """vmap(grad) of a sequence's token cross-entropy equals a loop of backward(), in float64."""
    model = build(name, input_shape=[6]).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = tokens(2, 6), tokens(2, 6, seed=1)

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),))[0], yi)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1])[0], y[i]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_example[k][i], p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's own
def test_forward_over_reverse_hvp_on_the_math_kernel() -> None:
    """jvp(grad) through attention (on the math kernel, as flatcli's operators fall back to)
    agrees with double backward."""
    model = build("gpt-tiny", input_shape=[5]).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = tokens(2, 5), tokens(2, 5, seed=1)

    def loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)).reshape(-1, 256), y.reshape(-1))

    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in params.items()}
    with sdpa_kernel([SDPBackend.MATH]):  # torch's fused CPU kernel has neither derivative
        _, hvp = jvp(grad(loss), (params,), (v,))
        leaves = [t.clone().requires_grad_() for t in params.values()]
        theta = dict(zip(params, leaves, strict=True))
        g = torch.autograd.grad(loss(theta), leaves, create_graph=True)
        dot = sum((gi * v[k]).sum() for gi, k in zip(g, params, strict=True))
        reference = torch.autograd.grad(dot, leaves)
    for k, r in zip(params, reference, strict=True):
        torch.testing.assert_close(hvp[k], r, rtol=1e-8, atol=1e-10, msg=k)


def test_no_inplace_modules() -> None:
    for name in LANGUAGE_MODELS:
        model = build(name)
        assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
