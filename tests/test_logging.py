"""Shape logging: the expected call tree for a two-layer model, as text and as data."""
import pytest
import torch

from config import ModelConfig
from modules.logging import TensorInfo
from modules.model import Model


def two_layer_model():
    torch.manual_seed(0)
    return Model(ModelConfig.preset("llama3-1m", n_layers=2, dim=32, n_heads=4, n_kv_heads=2, vocab_size=50,
                                    context_length=16, mlp_hidden=48))


EXPECTED_TREE = [
    (0, "", "Model.forward"),
    (1, "layers.0", "PreNorm.forward"),
    (2, "layers.0.attention_norm", "RMSNorm.forward"),
    (2, "layers.0.attention", "CausalSelfAttention.forward"),
    (3, "layers.0.attention.positions", "Rope.forward"),
    (2, "layers.0.mlp_norm", "RMSNorm.forward"),
    (2, "layers.0.mlp", "GatedMLP.forward"),
    (1, "layers.1", "PreNorm.forward"),
    (2, "layers.1.attention_norm", "RMSNorm.forward"),
    (2, "layers.1.attention", "CausalSelfAttention.forward"),
    (3, "layers.1.attention.positions", "Rope.forward"),
    (2, "layers.1.mlp_norm", "RMSNorm.forward"),
    (2, "layers.1.mlp", "GatedMLP.forward"),
    (1, "norm", "RMSNorm.forward"),
]


def test_two_layer_model_tree_as_data_and_text():
    model = two_layer_model()
    ids = torch.randint(0, 50, (2, 8))
    printed = []
    with model.log_shapes(print_fn=printed.append) as log:
        logits, loss = model(ids, ids)
    assert [(r.depth, r.path, f"{r.module}.{r.method}") for r in log.records] == EXPECTED_TREE

    root, layer, attention, rope = log.records[0], log.records[1], log.records[3], log.records[4]
    assert root.inputs["input_ids"] == TensorInfo((2, 8), "int64", "cpu")
    assert root.outputs["logits"] == TensorInfo((2, 8, 50), "float32", "cpu")
    assert root.outputs["loss"] == TensorInfo((), "float32", "cpu")
    # Queries (batch, 4 heads, 8 tokens, head_dim 8) and keys of 2 key/value heads, rotated in place.
    assert rope.inputs["q"] == rope.outputs["q"] == TensorInfo((2, 4, 8, 8), "float32", "cpu")
    assert rope.inputs["k"] == rope.outputs["k"] == TensorInfo((2, 2, 8, 8), "float32", "cpu")
    assert layer.inputs["x"].shape == (2, 8, 32) and layer.inputs["ctx"] == "Context(T=8, positions=0, start=0)"
    assert attention.outputs == {"output": TensorInfo((2, 8, 32), "float32", "cpu")}

    assert printed == log.lines and printed[0] == "Model.forward"
    assert "  in  input_ids: (2, 8) int64 cpu" in printed
    assert "    layers.0: PreNorm.forward" in printed
    assert "        layers.0.mlp: GatedMLP.forward" in printed
    assert printed[-1] == "  out loss: () float32 cpu"


def test_logging_a_submodule_only_and_stats():
    model = two_layer_model()
    with model.layers[1].mlp.log_shapes(stats=True, print_fn=None) as log:
        model(torch.randint(0, 50, (1, 5)))
    assert [(r.depth, r.path, r.method) for r in log.records] == [(0, "", "forward")]
    stats = log.records[0].outputs["output"].stats
    assert set(stats) == {"mean", "std", "min", "max", "rms"} and stats["min"] <= stats["mean"] <= stats["max"]
    # rms^2 = mean^2 + std^2 (n - 1) / n, std being the unbiased estimate: equal within a few percent
    assert stats["rms"] ** 2 == pytest.approx(stats["mean"] ** 2 + stats["std"] ** 2, rel=0.05)


def test_logging_is_off_by_default_and_after_the_context():
    model = two_layer_model()
    with model.log_shapes(print_fn=None):
        pass
    assert all(getattr(m, "_shape_log", None) is None for m in model.modules())
    assert "_shape_log" not in vars(model)


def test_logging_does_not_break_torch_compile():
    """Dynamo traces the whole model as one graph (fullgraph) with the decorators in place."""
    model = two_layer_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(0, 50, (2, 8))
    assert torch.allclose(compiled(ids, ids)[1], model(ids, ids)[1])
