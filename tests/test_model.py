"""The whole model: loss at init, overfitting, determinism, causality, masks, counts, registration."""
import json
import math

import pytest
import torch

from config import FORMAT_VERSION, ModelConfig
from conftest import ROOT
from modules.attention import ATTENTIONS, CausalSelfAttention
from modules.model import IGNORE_INDEX, Model
from modules.norm import NORMS, Norm
from toolkit.checkpoint import load_checkpoint, save_model

VARIANTS = {
    "gpt2": dict(preset="gpt2-1m"),
    "llama3": dict(preset="llama3-1m"),
    "mqa+qknorm+window": dict(preset="llama3-1m", n_kv_heads=1, qk_norm=True, sliding_window=5),
    "sandwich+cosinenorm+relu2": dict(preset="llama3-1m", norm_placement="sandwich", norm="cosinenorm", mlp="plain",
                                      activation="relu2"),
    "post+nopos+bias": dict(preset="gpt2-1m", norm_placement="post", positions="none"),
}


def small(preset, **overrides):
    values = dict(vocab_size=211, context_length=32, dim=32, n_layers=2, n_heads=4)
    return ModelConfig.preset(preset, **{**values, **overrides})


def make(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return Model(small(**{**VARIANTS[name], **overrides}))


@pytest.mark.parametrize("preset", ["gpt2-1m", "llama3-1m"])
def test_loss_at_init_is_close_to_uniform(preset):
    torch.manual_seed(0)
    model = Model(ModelConfig.preset(preset))
    ids = torch.randint(0, model.cfg.vocab_size, (4, 64))
    targets = torch.randint(0, model.cfg.vocab_size, (4, 64))
    _, loss = model(ids, targets)
    assert abs(loss.item() - math.log(model.cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_overfits_one_batch(name):
    model = make(name)
    ids = torch.randint(0, 211, (2, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 5 and loss.item() < 0.05


def test_same_seed_same_weights_and_losses():
    def run(seed):
        model = make("llama3", seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 211, (2, 17), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(3):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return model.state_dict(), losses

    (a, la), (b, lb), (c, lc) = run(0), run(0), run(1)
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)
    assert la != lc and not torch.equal(a["embed.weight"], c["embed.weight"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_parameter_registered_and_trained(name):
    model = make(name, norm_bias=True).double()  # tensors outside parameters/buffers would stay float32
    ids = torch.randint(0, 211, (2, 16))
    _, loss = model(ids, ids)
    assert loss.dtype == torch.float64
    loss.backward()
    for param_name, p in model.named_parameters():
        assert p.dtype == torch.float64 and p.grad is not None and p.grad.abs().sum() > 0, param_name
    assert all(b.dtype == torch.float64 for b in model.buffers())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_model_is_causal(name):
    model = make(name).eval()
    ids = torch.randint(0, 211, (1, 20))
    logits, _ = model(ids)
    for t in (0, 7, 18):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 211, changed[:, t + 1:].shape)
        assert torch.allclose(model(changed)[0][:, :t + 1], logits[:, :t + 1], atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "mqa+qknorm+window"])
def test_document_masking_equals_separate_documents(name):
    """Packed documents with doc_ids give each document the logits it gets alone (positions restart)."""
    model = make(name).eval()
    docs = [torch.randint(0, 211, (1, n)) for n in (7, 12, 5)]
    packed = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], 1)
    logits, _ = model(packed, doc_ids=doc_ids)
    alone = torch.cat([model(d)[0] for d in docs], 1)
    assert torch.allclose(logits, alone, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "mqa+qknorm+window"])
def test_left_padding_gives_unpadded_logits(name):
    model = make(name).eval()
    ids = torch.randint(0, 211, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    padding_mask = torch.arange(13)[None] >= 4
    logits, _ = model(padded, padding_mask=padding_mask)
    assert torch.allclose(logits[:, 4:], model(ids)[0], atol=1e-5)


def test_loss_ignores_padding_targets():
    model = make("llama3").eval()
    ids = torch.randint(0, 211, (2, 10))
    targets = ids.clone()
    targets[:, 6:] = IGNORE_INDEX
    logits, loss = model(ids, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :6].reshape(-1, 211), ids[:, :6].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_compiled_model_takes_new_lengths():
    """A second and third length make torch.compile trace with a symbolic length (as a last short batch
    or an evaluation at another length does in training); the graph stays whole and exact."""
    model = make("llama3")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for T in (16, 12, 9):
        ids = torch.randint(0, 211, (2, T))
        assert torch.allclose(compiled(ids, ids)[1], model(ids, ids)[1], atol=1e-6)


def test_a_failed_cache_step_changes_nothing(monkeypatch):
    """Only the end of a step fills the cache: a forward that fails half-way leaves it as it was (left
    padding and positions included), and the retried step gives the uncached logits."""
    model = make("llama3").eval()
    ids = torch.randint(0, 211, (2, 10))
    padding_mask = torch.arange(8)[None] >= torch.tensor([[0], [3]])
    cache = model.make_cache(2)
    model(ids[:, :8], padding_mask=padding_mask, cache=cache)
    state = (cache.length, cache.next_position.clone(), cache.key_valid.clone(), cache.padded)
    monkeypatch.setattr(model.layers[1], "forward", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(ids[:, 8:10], cache=cache)
    assert (cache.length, cache.padded) == (state[0], state[3]) and torch.equal(cache.next_position, state[1])
    assert torch.equal(cache.key_valid, state[2]) and state[0] == 8 and state[1].tolist() == [8, 5]
    monkeypatch.undo()
    retried = model(ids[:, 8:10], cache=cache)[0]
    full_mask = torch.cat([padding_mask, torch.ones(2, 2, dtype=torch.bool)], 1)
    assert torch.allclose(retried, model(ids, padding_mask=full_mask)[0][:, 8:], atol=1e-5)
    assert cache.length == 10 and cache.next_position.tolist() == [10, 7]


def test_an_attention_variant_can_bring_its_own_cache_layout(monkeypatch):
    """The cache asks each attention module for its entry: a layout slot-major instead of head-major
    needs only make_cache, and cached logits still equal uncached ones."""
    class SlotMajorKV:
        def __init__(self, batch_size, max_len, key_shape, value_shape, dtype, device):
            self.keys = torch.zeros(batch_size, max_len, *key_shape, dtype=dtype, device=device)
            self.values = torch.zeros(batch_size, max_len, *value_shape, dtype=dtype, device=device)

        def write(self, k, v, start):
            end = start + k.shape[2]
            self.keys[:, start:end], self.values[:, start:end] = k.transpose(1, 2), v.transpose(1, 2)
            return self.keys[:, :end].transpose(1, 2), self.values[:, :end].transpose(1, 2)

    class SlotMajorAttention(CausalSelfAttention):
        def make_cache(self, batch_size, max_len, dtype=torch.float32, device=None):
            return SlotMajorKV(batch_size, max_len, (self.n_kv_heads, self.head_dim),
                               (self.n_kv_heads, self.head_dim), dtype, device)

    monkeypatch.setitem(ATTENTIONS, "slot_major", SlotMajorAttention)
    model = make("llama3", attention="slot_major").eval()
    ids = torch.randint(0, 211, (2, 12))
    cache = model.make_cache(2)
    steps = [model(ids[:, :7], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(7, 12)]
    assert isinstance(cache.layers[0], SlotMajorKV) and cache.layers[0].keys.shape == (2, 32, 2, 8)
    assert torch.allclose(torch.cat(steps, 1), model(ids)[0], atol=1e-5)


def test_context_length_is_enforced():
    model = make("gpt2")
    with pytest.raises(ValueError, match="context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tied_and_untied_heads():
    gpt2, llama = make("gpt2"), make("llama3")
    assert gpt2.head.weight is gpt2.embed.weight
    assert llama.head.weight is not llama.embed.weight


def test_parameter_counts_and_flops():
    cfg = ModelConfig.preset("gpt2-1m")  # V=2048, T=256, d=128, L=4, MLP 512, biases, tied
    model = Model(cfg)
    d, V, T, L, h = 128, 2048, 256, 4, 512
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    assert model.n_params() == V * d + T * d + L * per_layer + 2 * d
    assert model.n_params(embeddings=False) == L * per_layer + 2 * d
    assert model.flops_per_token() == 6 * (L * per_layer + 2 * d + V * d) + 12 * L * d * T
    llama = Model(ModelConfig.preset("llama3-1m"))  # untied: the head is not counted without embeddings
    assert llama.n_params() - llama.n_params(embeddings=False) == 2 * V * d


def test_per_layer_parameter_counts_and_flops():
    """Each layer counts its own shape: layer 0 with one key/value head and a 100-wide MLP, layer 1 windowed."""
    cfg = ModelConfig.preset("llama3-1m", n_layers=2, layers={"0": {"n_kv_heads": 1, "mlp_hidden": 100},
                                                               "1": {"sliding_window": 16}})
    model = Model(cfg)
    d, V, T, H, D = 128, 2048, 256, 4, 32

    def layer(kv_heads, hidden):  # qkv, out, gated MLP (up holds gate and up), two norms; no biases
        return d * (H + 2 * kv_heads) * D + H * D * d + d * 2 * hidden + hidden * d + 2 * d

    weights = layer(1, 100) + layer(2, 341) + d
    assert model.n_params(embeddings=False) == weights and model.n_params() == weights + 2 * V * d
    attention = 12 * H * D * T + 12 * H * D * 16  # layer 1 attends to 16 keys, not 256
    assert model.flops_per_token() == 6 * (weights + V * d) + attention


def test_a_per_layer_model_is_its_layers_composed():
    """A model whose layer 0 is windowed and has no positions computes exactly what layer 0 of a uniform
    model of that kind, then layer 1 of a plain one, compute on the same weights."""
    per_layer = make("llama3", layers={"0": {"sliding_window": 3, "positions": "none"}})
    windowed, plain = make("llama3", sliding_window=3, positions="none"), make("llama3")
    windowed.load_state_dict(per_layer.state_dict())
    plain.load_state_dict(per_layer.state_dict())
    ids = torch.randint(0, 211, (2, 12))
    x = windowed.layers[0](per_layer.embed(ids))
    expected = per_layer.head(per_layer.norm(plain.layers[1](x)))
    assert torch.allclose(per_layer(ids)[0], expected, atol=1e-6)
    assert not torch.allclose(plain(ids)[0], expected, atol=1e-3)  # and the per-layer choice does matter


def test_scaled_init():
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("gpt2-1m", n_layers=8))
    assert model.layers[0].attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for residual in (model.layers[0].attention.out.weight, model.layers[0].mlp.down.weight):
        assert residual.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.layers[0].attention.qkv.bias.abs().sum() == 0


def test_a_new_norm_is_one_class_and_one_registry_line(monkeypatch):
    class ScaleNorm(Norm):
        def forward(self, x):
            return x / x.abs().max(-1, keepdim=True).values * self.weight

    monkeypatch.setitem(NORMS, "scalenorm", ScaleNorm)
    model = Model(small("llama3-1m", norm="scalenorm"))
    assert isinstance(model.norm, ScaleNorm)
    assert torch.isfinite(model(torch.randint(0, 211, (1, 8)))[0]).all()


# Two small models (gpt2-1m and llama3-1m shapes at 32 dims) saved by the code before the per-layer redesign
# (commit fefa8d7, format 1) in tests/fixtures/format1, and logits[1, -1, :4] and the float64 sum of all
# their logits on OLD_IDS, computed by that code from the same files.
OLD_IDS = torch.arange(1, 65).reshape(2, 32) * 31 % 256
OLD_FORMAT = {
    "gpt2_format1": (["-0x1.30bee60000000p-3", "-0x1.22bea40000000p-4", "0x1.8874220000000p-3",
                      "0x1.21186a0000000p-4"], 23.534282440806237),
    "llama3_format1": (["-0x1.97d2e00000000p-4", "0x1.3452fe0000000p-6", "-0x1.1bef8e0000000p-3",
                        "-0x1.2e8fea0000000p-4"], -2.1769710175835826),
}


@pytest.mark.parametrize("name", sorted(OLD_FORMAT))
def test_models_saved_before_the_redesign_give_bit_identical_logits(name, tmp_path):
    """A model_config.json that predates format versions (format 1) is migrated on load, and the logits
    are the very bits the old code computed. Saving again writes today's format."""
    directory = ROOT / "tests" / "fixtures" / "format1" / name
    assert "format_version" not in json.loads((directory / "model_config.json").read_text())
    model, _ = load_checkpoint(directory)
    with torch.no_grad():
        logits = model(OLD_IDS)[0]
    values, total = OLD_FORMAT[name]
    assert [float.hex(v) for v in logits[1, -1, :4].tolist()] == values
    assert logits.double().sum().item() == total
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "model_config.json").read_text())["format_version"] == FORMAT_VERSION
