"""bench.py: its plain reference GPT is a correct model and computes the project Model's function (so
the speed ratio compares like with like), its timing helpers, the sample reader and the CLI."""
import itertools
import math
import re

import pytest
import torch

import bench
from config import ModelConfig
from conftest import ROOT
from modules.mlp import ACTIVATIONS
from modules.model import Model
from toolkit import data

DIMS = {"vocab_size": 512, "context_length": 32, "dim": 32, "n_layers": 2, "n_heads": 4}
KV_HEADS = {"gpt2": 4, "llama": 2}


def plain(kind, seed=0):
    torch.manual_seed(seed)
    return bench.PlainGPT(kind, **DIMS, n_kv_heads=KV_HEADS[kind], mlp_hidden=(4 * 32 if kind == "gpt2" else 85))


def random_batch(seed=0, batch_size=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, DIMS["vocab_size"], (2, batch_size, DIMS["context_length"]), generator=generator)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reference_loss_at_init_is_log_vocab(kind):
    input_ids, targets = random_batch(batch_size=8)
    _, loss = plain(kind)(input_ids, targets)
    assert abs(loss.item() - math.log(DIMS["vocab_size"])) < 0.1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reference_adamw_steps_reduce_the_loss_on_a_fixed_batch(kind):
    model = plain(kind)
    input_ids, targets = random_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        _, loss = model(input_ids, targets)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reference_is_causal(kind):
    model = plain(kind)
    input_ids, _ = random_batch()
    changed = input_ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % DIMS["vocab_size"]
    with torch.no_grad():
        before, after = model(input_ids)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :20], before[:, :20], rtol=0, atol=1e-6)
    assert (after[:, 20:] - before[:, 20:]).abs().amax(dim=-1).min() > 1e-3  # every later position sees it


def test_the_gpt2_preset_is_the_architecture_of_the_gpt2_reference():
    cfg = ModelConfig.preset("gpt2-1m")
    assert (cfg.positions, cfg.norm, cfg.norm_bias, cfg.norm_eps, cfg.norm_placement) == (
        "learned", "layernorm", True, 1e-5, "pre")
    assert (cfg.mlp, cfg.mlp_hidden, cfg.bias, cfg.tie_embeddings, cfg.n_kv_heads) == (
        "plain", 4 * cfg.dim, True, True, cfg.n_heads)
    x = torch.linspace(-4, 4, 101)
    # exact GELU
    torch.testing.assert_close(ACTIVATIONS[cfg.activation](x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))


@pytest.mark.parametrize(("kind", "preset"), [("gpt2", "gpt2-1m"), ("llama", "llama3-1m")])
def test_reference_and_project_model_compute_the_same_function(kind, preset):
    reference = plain(kind)
    with torch.no_grad():  # random values everywhere, so that every bias and norm weight takes part
        for p in reference.parameters():
            p.normal_(0.0, 0.3)
    model = Model(ModelConfig.preset(preset, **DIMS, n_kv_heads=KV_HEADS[kind],
                                     mlp_hidden=reference.layers[0].mlp.down.in_features))
    model.load_state_dict(reference.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    input_ids, targets = random_batch()
    (ours, our_loss), (theirs, their_loss) = model(input_ids, targets), reference(input_ids, targets)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_loss, their_loss, rtol=0, atol=1e-5)
    assert theirs.std() > 0.3  # logits that vary: the comparison is not between two near-constant outputs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_matching_models_have_equal_parameter_counts_and_the_kinds_layout(kind):
    ours, reference = bench.matching_models(kind, **DIMS, n_kv_heads=KV_HEADS[kind])
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [p.shape for p in ours.state_dict().values()] == [p.shape for p in reference.state_dict().values()]


def test_interleaved_seconds_alternate_the_order_and_count_every_round():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = bench.interleaved_seconds(runs, rounds=3)
    assert calls == list("abccbaabc")
    assert [len(s) for s in seconds.values()] == [3, 3, 3]


def test_speed_ratio_is_the_median_of_per_round_ratios():
    seconds = {"ours": [1.0, 2.0, 1.0, 4.0], "theirs": [2.0, 2.0, 3.0, 2.0]}
    assert bench.speed_ratio(seconds, "ours", "theirs") == 1.5  # ratios 2, 1, 3, 0.5
    assert bench.speed_ratio(seconds, "theirs", "ours") == 0.75


def test_a_missing_sample_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data.EMBEDDED, "tinystories-sample", tmp_path / "data" / "tinystories" / "train.txt.gz")
    with pytest.raises(SystemExit) as exit:
        bench.main(["tokenizer"])
    assert re.fullmatch(r"error: the shipped text 'tinystories-sample' is missing .*: restore .*", str(exit.value.code))


def test_model_section_prints_both_ratios(capsys):
    bench.main(["model", "--vocab_size=64", "--context_length=16", "--dim=16", "--n_layers=1", "--batch_size=2",
                "--steps=1", "--rounds=1"])
    ratios = re.findall(r"^(gpt2|llama) .* ratio (\d+\.\d+)", capsys.readouterr().out, flags=re.MULTILINE)
    assert [kind for kind, _ in ratios] == ["gpt2", "llama"]
    assert all(float(ratio) > 0 for _, ratio in ratios)


@pytest.mark.parametrize(("option", "message"), [
    ("--dim=30", "error: n_heads=4 is not valid: must divide dim=30"),
    ("--n_kv_heads=3", "error: n_kv_heads=3 is not valid: must divide n_heads=4"),  # llama's, caught before gpt2 runs
])
def test_bad_dims_are_a_one_line_error_before_any_timing(option, message, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["model", option])
    assert str(exit.value.code).startswith(message)
    assert capsys.readouterr().out == ""


def test_bench_does_not_depend_on_the_shared_folder():
    # Users have only the repository: no path to the developers' ../shared folder, in code or messages.
    assert re.search(r"shared[/\\'\"]", (ROOT / "bench.py").read_text()) is None
