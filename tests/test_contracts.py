"""Contract tests: every entry of every registry (config.REGISTRIES: attention, positions, norm,
norm_placement, mlp, activation), built in or added later, goes through the same checks. The cases are
read from the registries, so a new variant is tested by registering it.

Each entry runs in two models: on every layer ("all"), and on layer 0 only with a sliding window there
while layer 1 keeps the defaults ("mixed"; model-wide entries such as learned positions stay
model-wide), so that layers with different masks and positions share one forward. The checks about
masks and positions run on the mixed model, the cache on both, the rest on the model with the entry
everywhere.
"""
import pytest
import torch

from config import REGISTRIES, ConfigError, ModelConfig
from modules.logging import LoggingModule
from modules.model import Model
from toolkit.checkpoint import load_checkpoint, save_model

BASE = dict(vocab_size=64, context_length=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48,
            bias=True, norm_bias=True, qk_norm=True)  # every optional weight present, so every one is checked
ENTRIES = [(field, name) for field, registry in REGISTRIES.items() for name in registry]


def cases(*flavours):
    return pytest.mark.parametrize("case", [(field, name, flavour) for field, name in ENTRIES for flavour in flavours],
                                   ids=lambda case: f"{case[0]}={case[1]}-{case[2]}")


def config(field, name, flavour) -> ModelConfig:
    if flavour == "all":
        return ModelConfig(**BASE, **{field: name})
    try:
        return ModelConfig(**BASE, layers={"0": {field: name, "sliding_window": 5}})
    except ConfigError:  # a model-wide choice (an input embedding): the window alone differs per layer
        return ModelConfig(**BASE, **{field: name}, layers={"0": {"sliding_window": 5}})


def make(case, seed=0) -> Model:
    torch.manual_seed(seed)
    model = Model(config(*case))
    with torch.no_grad():  # norm scales and shifts away from 1 and 0, so that a misplaced one would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm.bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def tokens(*shape, seed=1):
    return torch.randint(0, BASE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def max_difference(a, b):
    return (a - b).abs().max().item()


@cases("all")
def test_every_parameter_is_registered_and_gets_a_gradient(case):
    model = make(case).train().double()  # a tensor outside parameters and buffers would stay float32
    ids = tokens(2, 16)
    _, loss = model(ids, ids)
    assert loss.dtype == torch.float64
    loss.backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(b.dtype == torch.float64 for b in model.buffers())


@cases("mixed")
def test_causal(case):
    model = make(case)
    ids = tokens(1, 20)
    logits, _ = model(ids)
    for t in (0, 7, 18):
        changed = ids.clone()
        changed[:, t + 1:] = tokens(1, 19 - t, seed=t)
        assert max_difference(model(changed)[0][:, :t + 1], logits[:, :t + 1]) <= 1e-5


@cases("all", "mixed")
def test_kv_cache_equals_no_cache_for_a_left_padded_batch(case):
    """A prompt batch (left-padded), a chunk of 3 tokens, then single tokens: every step's logits equal
    each sequence's own uncached logits."""
    model = make(case)
    lengths, total = (9, 5), 9 + 3 + 4
    sequences = [tokens(1, n + 7, seed=n)[0] for n in lengths]
    batch = torch.zeros(2, total, dtype=torch.long)
    valid = torch.zeros(2, total, dtype=torch.bool)
    for row, (n, seq) in enumerate(zip(lengths, sequences)):
        batch[row, 9 - n:] = seq
        valid[row, 9 - n:] = True
    cache = model.make_cache(2, total)
    steps = [(0, 9), (9, 12)] + [(t, t + 1) for t in range(12, total)]
    with torch.no_grad():
        cached = torch.cat([model(batch[:, a:b], padding_mask=valid[:, a:b], cache=cache)[0] for a, b in steps], 1)
        for row, (n, seq) in enumerate(zip(lengths, sequences)):
            assert max_difference(cached[row, 9 - n:], model(seq[None])[0][0]) <= 1e-5
    assert cache.length == total


@cases("mixed")
def test_left_padded_batch_equals_each_sequence_alone(case):
    model = make(case)
    sequences = [tokens(1, n, seed=n)[0] for n in (13, 6)]
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0], batch[1, 7:] = sequences
    padding_mask = torch.arange(13)[None] >= torch.tensor([[0], [7]])
    logits, _ = model(batch, padding_mask=padding_mask)
    assert max_difference(logits[0], model(sequences[0][None])[0][0]) <= 1e-5
    assert max_difference(logits[1, 7:], model(sequences[1][None])[0][0]) <= 1e-5


@cases("mixed")
def test_packed_documents_equal_each_document_alone(case):
    model = make(case)
    docs = [tokens(1, n, seed=n) for n in (7, 12, 5)]
    doc_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], 1)
    logits, _ = model(torch.cat(docs, 1), doc_ids=doc_ids)
    assert max_difference(logits, torch.cat([model(d)[0] for d in docs], 1)) <= 1e-5


@cases("all")
def test_shape_logging_records_every_module(case):
    """Every logging module of the model, the entry's own included, shows up in the log with its path."""
    model = make(case)
    ids = tokens(2, 8)
    with model.log_shapes(print_fn=None) as log:
        logits, _ = model(ids)
    recorded = {(r.path, r.module) for r in log.records}
    expected = {(name, type(m).__name__) for name, m in model.named_modules()
                if isinstance(m, LoggingModule) and hasattr(type(m).forward, "__wrapped__")}
    assert expected <= recorded
    field, name, _ = case
    entry = REGISTRIES[field][name]
    if isinstance(entry, type):
        assert any(r.module == entry.__name__ for r in log.records)
    assert log.records[0].outputs["logits"].shape == tuple(logits.shape)


@cases("all")
def test_shape_logging_with_statistics_changes_nothing_and_shows_attention_logits(case):
    """Statistics on: the same logits, each module's output RMS, and from every attention module its scores
    (pre-softmax logits at the allowed pairs), as many as heads x allowed pairs."""
    model = make(case)
    ids = tokens(2, 8)
    with torch.no_grad():
        plain, _ = model(ids)
        with model.log_shapes(stats=True, print_fn=None) as log:
            logits, _ = model(ids)
    assert torch.equal(plain, logits)
    rms = logits.square().mean().sqrt().item()
    assert log.records[0].outputs["logits"].stats["rms"] == pytest.approx(rms, rel=1e-5)
    scores = {r.path: r.outputs["scores"] for r in log.records if r.method == "scores"}
    attentions = [name for name, m in model.named_modules() if hasattr(type(m), "scores")]
    assert sorted(scores) == sorted(attentions) and attentions
    for name in attentions:
        module = model.get_submodule(name)
        window = module.mask_spec.window or 8
        allowed = sum(min(i + 1, window) for i in range(8))
        assert scores[name].shape == (2 * module.n_heads * module.qk_split * allowed,)
        assert scores[name].stats["min"] <= scores[name].stats["max"]


@cases("all")
def test_checkpoint_round_trip(case, tmp_path):
    model = make(case)
    save_model(model, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)
    ids = tokens(2, 12)
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def claims_fullgraph(model) -> bool:
    """Whether every module of the model says torch.compile traces it whole (the default)."""
    return all(getattr(m, "compiles_fullgraph", True) for m in model.modules())


@pytest.mark.slow
@cases("all")
def test_compiles_as_one_graph_where_claimed(case):
    """torch.compile(fullgraph=True) traces the training forward (no graph breaks) and computes the same
    loss, with packed documents too. The eager backend checks the graph capture quickly."""
    model = make(case)
    if not claims_fullgraph(model):
        pytest.skip(f"{case[1]} does not claim to compile as one graph")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = tokens(2, 16)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    assert max_difference(compiled(ids, ids)[1], model(ids, ids)[1]) <= 1e-6
    assert max_difference(compiled(ids, ids, doc_ids=doc_ids)[1], model(ids, ids, doc_ids=doc_ids)[1]) <= 1e-6
