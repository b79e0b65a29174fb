"""``initdiag report --train``: training results in the study, the table, the
sentences (every one changes when a number behind it does), the plot and the
JSON; the [train] table of study files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import initdiag as idg
from initdiag.cli import main
from initdiag.configfile import ConfigError, load_study
from initdiag.report.study import explain, run_study
from initdiag.report.training import (
    total_steps,
    train_settings,
    training_sentences,
    training_target,
)

STUDY = """
[study]
name = "tiny"

[network]
depth = 4
width = 32
activation = "relu"

[simulate]
batch_size = 32
seeds = 2

[train]
steps = 30
seeds = 2
batch_size = 32
eval_every = 10
lr_grid = [0.01, 0.1]
workers = 1

[[variants]]
name = "bias = 0"

[[variants]]
name = "bias = 1"
init = { bias = "constant(1.0)" }

[[variants]]
name = "BN"
network = { batchnorm = true }
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "tiny.toml"
    path.write_text(STUDY)
    study = load_study(str(path))
    train = train_settings(study.train, None)
    res = run_study(
        study.networks,
        simulate_kw=study.simulate,
        train=train,
        progress=lambda label, steps=1: None,
    )
    return path, study, res


def test_every_variant_is_trained_with_the_study_settings(trained):
    _, study, res = trained
    assert all(e.training is not None for e in res.entries)
    for e in res.entries:
        r = e.training
        assert r.steps == 30 and r.seeds == 2 and r.batch_size == 32
        assert r.lr in (0.01, 0.1)
        # a pilot of a quarter of the steps on seed 0 chose the rate (the next
        # one also ran in full when the chosen one diverged on another seed)
        pilot = [row for row in r.lr_search if not row["full"]]
        assert len(pilot) == 2
        assert all(row["steps"] == 8 and row["seeds"] == 1 for row in pilot)
        full = [row for row in r.lr_search if row["full"]]
        if full:
            assert r.lr == min(full, key=lambda row: row["final_loss"])["lr"]
        else:
            assert r.lr == min(pilot, key=lambda row: row["final_loss"])["lr"]
    t = training_target([e.training for e in res.entries])
    finals = sorted(e.training.final_loss()[0] for e in res.entries)
    assert finals[1] <= t < finals[1] * 1.1  # the median, rounded up
    assert all(e.training.target == t for e in res.entries)
    assert total_steps(3, train_settings(study.train, None)) == 3 * (2 * 8 + 2 * 30)


def test_sentences_quote_the_training_numbers(trained):
    _, _, res = trained
    sents = {s.id: s.text for s in res.explanation()}
    s1 = res.summaries()[1]
    text = sents["training:bias = 1"]
    assert f"{s1['train_final_loss']:.3g}"[:4] in text
    assert "bias = 0's" in text  # compared with the reference
    assert "training:setup" in sents and "30 steps of SGD" in sents["training:setup"]
    assert "training:noise" in sents


def test_every_training_sentence_changes_with_its_numbers(trained):
    _, _, res = trained
    summaries = res.summaries()
    settings = res.settings
    checked = 0
    for sent in training_sentences(summaries, settings):
        assert sent.keys
        for pos, key in sent.keys:
            mod = [dict(s) for s in summaries]
            v = mod[pos][key]
            mod[pos][key] = 0.37 if (v != v or v == 0) else v * 1.37 + 1
            after = {s.id: s.text for s in explain(mod, settings)}
            assert after.get(sent.id) != sent.text, (sent.id, key)
            checked += 1
    assert checked >= 20


def _summary(name, loss, se, reached=2, steps_to=50.0, diverged=0):
    return {
        "name": name,
        "n_blocks": 10,
        "q_first": 1.0,
        "q_last": 2.0,
        "grad_ratio": 1.0,
        "train_lr": 0.1,
        "train_final_loss": loss,
        "train_final_loss_se": se,
        "train_test_acc": 0.5,
        "train_test_acc_se": 0.01,
        "train_target": 0.5,
        "train_steps_to_target": steps_to,
        "train_reached": reached,
        "train_seeds": 2,
        "train_steps": 100,
        "train_diverged": diverged,
        "train_divergence_step": 7 if diverged else math.nan,
    }


def test_the_noise_sentence_says_when_variants_do_not_differ():
    same = [
        _summary("a", 0.50, 0.02),
        _summary("b", 0.52, 0.02),
        _summary("c", 0.49, 0.03),
    ]
    s = {x.id: x.text for x in training_sentences(same, {"train": {}})}
    assert "No variant's final training loss differs" in s["training:noise"]
    assert "within noise" in s["training:b"]
    apart = [_summary("a", 0.50, 0.01), _summary("b", 0.90, 0.01)]
    s = {x.id: x.text for x in training_sentences(apart, {"train": {}})}
    assert (
        "beyond noise" in s["training:noise"]
        and "below every other" in s["training:noise"]
    )
    assert "higher than a's" in s["training:b"]
    assert "1.00x the steps of a" in s["training:b"]
    div = [_summary("a", 0.5, 0.01), _summary("b", math.inf, math.nan, 0, math.nan, 2)]
    s = {x.id: x.text for x in training_sentences(div, {"train": {}})}
    assert "diverged in 2 of 2 seeds (first at step 7" in s["training:b"]


def test_cli_train_writes_the_table_the_plot_and_the_json(trained, tmp_path, capsys):
    path, _, _ = trained
    out = tmp_path / "out"
    rc = main(["report", str(path), "--train", "20", "--out", str(out), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Training (20 steps)" in text and "steps to" in text
    assert (out / "training.png").stat().st_size > 10_000
    d = json.loads((out / "report.json").read_text())
    tr = d["variants"][0]["training"]
    assert tr["steps"] == 20 and len(tr["test_loss"]) == 2
    assert d["settings"]["train"]["steps"] == 20
    assert d["variants"][0]["summary"]["train_final_loss"] == pytest.approx(
        tr["final_loss"]
    )


def test_training_in_worker_processes_equals_training_here(tmp_path):
    from initdiag.report.training import run_training

    nets = [idg.mlp(depth=2, width=16, input_dim=16, name=f"n{k}") for k in range(2)]
    s = {"steps": 10, "seeds": 1, "lr": 0.05, "batch_size": 16, "eval_every": 5}
    here = run_training(nets, {**s, "workers": 1})
    pool = run_training(nets, {**s, "workers": 2})
    for a, b in zip(here, pool, strict=True):
        np.testing.assert_array_equal(a.step_loss, b.step_loss)


def test_the_train_table_is_checked(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[network]\ndepth = 2\nwidth = 8\n[train]\nstep = 10\n")
    with pytest.raises(ConfigError, match=r"\[train\] unknown keys \['step'\]"):
        load_study(str(p))
    p.write_text("[network]\ndepth = 2\nwidth = 8\n[train]\nlr_grid = [0.1, -1]\n")
    with pytest.raises(ConfigError, match="lr_grid must be a list of numbers > 0"):
        load_study(str(p))
    assert train_settings({}, None) is None  # no steps: no training
    assert train_settings({"seeds": 3}, 50)["steps"] == 50


def test_noise_is_judged_by_students_t_for_the_seeds_run():
    # |z| = 5: noise with 2 seeds (t quantile 12.7), a difference with 10 (2.26)
    a, b = (
        _summary("a", 0.50, 0.01),
        _summary("b", 0.50 + 5 * math.hypot(0.01, 0.01), 0.01),
    )
    s = {x.id: x.text for x in training_sentences([a, b], {"train": {}})}
    assert (
        "within noise (|z| = 5.0; 12.7 is the two-sided 95% t quantile for 2 seeds)"
        in s["training:b"]
    )
    a["train_seeds"] = b["train_seeds"] = 10
    s = {x.id: x.text for x in training_sentences([a, b], {"train": {}})}
    assert "beyond noise (|z| = 5.0 > 2.26)" in s["training:b"]
