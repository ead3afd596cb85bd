"""The evaluation harness (issue 5 §1): masked forward vs the oracle, metrics, outputs, CLI."""
import csv
import math
import subprocess
import sys

import pytest
import torch

import reference
from d3kernels import PRESETS, DepthSchedule, LlamaD3
from d3kernels import eval as ev

N_NEW = 10


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=3)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (6, 3, 11)]


@pytest.fixture(scope="module")
def held():
    g = torch.Generator().manual_seed(8)
    return torch.randint(0, 512, (40,), generator=g).tolist()


SKIPPY = DepthSchedule(alpha=0.8, start=1, head=1, tail=1, order="upper")


@pytest.fixture(scope="module")
def results(tiny64, prompts, held):
    schedules = [DepthSchedule(alpha=1.0), SKIPPY,
                 DepthSchedule(alpha=0.9, head=1, tail=2, order="lower", min_depth=4)]
    return ev.evaluate(tiny64, prompts, schedules, N_NEW, held, progress=False)


def oracle_keep(s: DepthSchedule, L: int, prefix: int, total: int,
                reply_len: int | None = None) -> torch.Tensor:
    """keep rows built from the oracle's schedule functions, independently of d3kernels;
    reply_len: the schedule restarts every reply_len tokens after the prefix."""
    md = s.head + s.tail if s.min_depth is None else s.min_depth
    rows = []
    for p in range(total):
        i = p - (prefix - 1)
        if i > 0 and reply_len is not None:
            i %= reply_len
        depth = L if i <= 0 else reference.depth_at(i, L, s.alpha, s.start, md)
        kept = set(reference.kept_layers(depth, L, s.head, s.tail, s.order))
        rows.append([j in kept for j in range(L)])
    return torch.tensor(rows)


def nll_of(model, prompt, gen):
    logits = model.logits(torch.tensor([prompt + gen]))[0]
    lp = torch.log_softmax(logits.double(), -1)
    return [-float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(gen)]


# ---- masked forward -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_logits_equal_oracle_with_random_keep(tiny64, seed):
    g = torch.Generator().manual_seed(seed)
    L = tiny64.config.num_layers
    ids = torch.randint(0, 512, (2, 13), generator=g)
    keep = torch.rand(2, 13, L, generator=g) < 0.6
    want = reference.llama_forward(tiny64.state_dict(), tiny64.config, ids, keep)
    got = ev.masked_logits(tiny64, ids, keep)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_masked_logits_without_mask_are_full_depth(tiny64):
    ids = torch.arange(20) * 7 % 512
    torch.testing.assert_close(ev.masked_logits(tiny64, ids), tiny64.logits(ids),
                               rtol=1e-12, atol=1e-12)
    all_kept = torch.ones(20, tiny64.config.num_layers, dtype=torch.bool)
    torch.testing.assert_close(ev.masked_logits(tiny64, ids, all_kept), tiny64.logits(ids),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", [SKIPPY, DepthSchedule(alpha=0.7, head=2, tail=1),
                                      DepthSchedule(alpha=0.85, head=0, tail=0,
                                                    order=(3, 0, 7, 5, 1, 6, 4, 2))])
def test_reply_keep_matches_oracle_and_engine(tiny64, prompts, schedule):
    """reply_keep gives the oracle's rows, and the masked forward over prompt + D³ output
    predicts exactly the tokens the cached engine generated (same semantics end to end)."""
    L = tiny64.config.num_layers
    p = prompts[0]
    gen = tiny64.generate([p], 12, schedule).tokens[0]
    seq = p + gen
    keep = ev.reply_keep(schedule, L, len(p), len(seq))
    assert torch.equal(keep, oracle_keep(schedule, L, len(p), len(seq)))
    logits = ev.masked_logits(tiny64, torch.tensor([seq]), keep)[0]
    assert logits[len(p) - 1:-1].argmax(-1).tolist() == gen


def test_reply_keep_restarts_every_reply_len_tokens():
    s = DepthSchedule(alpha=0.7, head=1, tail=1)
    L, P, R = 8, 3, 5
    one = ev.reply_keep(s, L, P, P + 3 * R)
    split = ev.reply_keep(s, L, P, P + 3 * R, reply_len=R)
    # the pass at position P - 1 + i predicts held token i; reply c is tokens cR .. cR + R - 1
    assert torch.equal(split[:P - 1 + R], one[:P - 1 + R])
    for c in (1, 2):  # each later reply repeats the first one's rows: full depth at its start
        assert torch.equal(split[P - 1 + c * R:P - 1 + (c + 1) * R], one[P - 1:P - 1 + R])
    assert split[P - 1 + R].all() and not one[P - 1 + R].all()
    assert torch.equal(ev.reply_keep(s, L, P, P + 7, reply_len=100), ev.reply_keep(s, L, P, P + 7))


def _reference_held_ppl(model, seq, keep):
    logits = reference.llama_forward(model.state_dict(), model.config, torch.tensor([seq]),
                                     keep[None])[0]
    lp = torch.log_softmax(logits, -1)
    nll = [-float(lp[t - 1, seq[t]]) for t in range(1, len(seq))]
    return math.exp(sum(nll) / len(nll))


def test_held_reply_tokens(tiny64, prompts, held, results):
    """Held text read as replies of N tokens; by default N = max_new_tokens (N_NEW in
    ``results``), and N past the held text's length reads it as one reply."""
    [whole, split, default] = [ev.evaluate(tiny64, prompts[:1], [SKIPPY], 3, held,
                                           progress=False, held_reply_tokens=n)[0]
                               for n in (len(held), 8, None)]
    for n, got in ((None, whole), (8, split), (N_NEW, results[1]), (3, default)):
        keep = ev.reply_keep(SKIPPY, 8, 1, len(held), reply_len=n)
        assert got.held_ppl == pytest.approx(_reference_held_ppl(tiny64, held, keep), rel=1e-9)
    assert len({whole.held_ppl, split.held_ppl, default.held_ppl}) == 3
    with pytest.raises(ValueError, match="held_reply_tokens"):
        ev.evaluate(tiny64, prompts, [SKIPPY], 3, held, progress=False, held_reply_tokens=0)


def test_masked_logits_bad_keep_shape(tiny64):
    with pytest.raises(ValueError, match="keep"):
        ev.masked_logits(tiny64, torch.arange(5), torch.ones(4, 3, dtype=torch.bool))


# ---- metrics on a tiny random model -------------------------------------------------------------

def test_alpha_one_is_exactly_full_depth(results, tiny64, prompts, held):
    r = results[0]
    full = tiny64.generate(prompts, N_NEW, None).tokens
    assert r.exact_match == 1.0
    assert r.first_divergence == [None] * len(prompts)
    assert r.mean_first_divergence == sum(map(len, full)) / len(full)
    assert r.tokens == full
    assert r.delta_nll == 0.0 and r.nll == r.full_nll
    assert r.layer_ratio == 1.0 and r.work_ratio == 1.0
    assert r.held_ppl == r.full_held_ppl
    want_nll = [x for p, gen in zip(prompts, full) for x in nll_of(tiny64, p, gen)]
    assert r.full_nll == pytest.approx(sum(want_nll) / len(want_nll), rel=1e-9)
    held_nll = nll_of(tiny64, held[:1], held[1:])
    assert r.full_held_ppl == pytest.approx(math.exp(sum(held_nll) / len(held_nll)), rel=1e-9)
    assert r.mean_new_tokens == N_NEW  # the tiny preset has no stop token
    assert r.decode_tokens_per_s > 0 and r.full_decode_tokens_per_s > 0
    assert r.realized_speedup > 0


def test_skipping_schedule_metrics_match_independent_computation(results, tiny64, prompts,
                                                                 held):
    r = results[1]
    L = tiny64.config.num_layers
    assert r.schedule == SKIPPY
    full = tiny64.generate(prompts, N_NEW, None).tokens
    d3 = [tiny64.generate([p], N_NEW, SKIPPY).tokens[0] for p in prompts]
    assert r.tokens == d3
    div = [None if a == b else next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
           for a, b in zip(d3, full)]
    assert r.first_divergence == div
    assert any(d is not None for d in div), "pick a schedule that diverges on the tiny model"
    assert r.exact_match == sum(d is None for d in div) / len(div)
    assert r.mean_first_divergence == pytest.approx(
        sum(N_NEW if d is None else d for d in div) / len(div))
    nll = [x for p, gen in zip(prompts, d3) for x in nll_of(tiny64, p, gen)]
    assert r.nll == pytest.approx(sum(nll) / len(nll), rel=1e-9)
    assert r.delta_nll == pytest.approx(r.nll - r.full_nll)
    # held perplexity: the oracle's masked recompute with the oracle's keep rows, the held
    # text read as replies of N_NEW tokens (the default: max_new_tokens)
    keep = oracle_keep(SKIPPY, L, 1, len(held), reply_len=N_NEW)
    logits = reference.llama_forward(tiny64.state_dict(), tiny64.config,
                                     torch.tensor([held]), keep[None])[0]
    lp = torch.log_softmax(logits, -1)
    held_nll = [-float(lp[t - 1, held[t]]) for t in range(1, len(held))]
    assert r.held_ppl == pytest.approx(math.exp(sum(held_nll) / len(held_nll)), rel=1e-9)
    assert r.held_ppl != r.full_held_ppl
    # layer ratio over the timed runs: every prompt decodes N_NEW - 1 steps
    depths = [reference.depth_at(i, L, 0.8, 1, 2) for i in range(1, N_NEW)]
    assert r.layer_ratio == pytest.approx(L * len(depths) / sum(depths))
    assert 1.0 < r.work_ratio < r.layer_ratio


def test_divergence_when_a_stop_token_ends_one_output_early(prompts):
    """With a stop token, outputs differ in length; a prefix counts as diverging where the
    shorter one ends."""
    base = LlamaD3.random("tiny", dtype=torch.float64, seed=3)
    full = base.generate([prompts[0]], N_NEW, None).tokens[0]
    stop = full[4]
    if stop in full[:4]:
        pytest.skip("the token repeats early")
    cfg = PRESETS["tiny"].replace(eos_token_ids=(stop,))
    model = LlamaD3.random(cfg, dtype=torch.float64, seed=3)
    [r] = ev.evaluate(model, [prompts[0]], [DepthSchedule(alpha=1.0)], N_NEW, progress=False)
    assert r.tokens == [full[:5]] and r.full_lengths == [5]
    assert r.held_ppl is None and r.full_held_ppl is None
    res = ev.evaluate(model, [prompts[0]], [SKIPPY], N_NEW, progress=False)[0]
    a, b = res.tokens[0], full[:5]
    if a != b:
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert res.first_divergence == [want]


def test_evaluate_rejects_bad_input(tiny64, prompts):
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.evaluate(tiny64, prompts, [SKIPPY], 1, progress=False)
    with pytest.raises(ValueError, match="schedules"):
        ev.evaluate(tiny64, prompts, [], 4, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        ev.evaluate(tiny64, ["hello"], [SKIPPY], 4, progress=False)
    with pytest.raises(ValueError, match="generate_kwargs"):
        ev.evaluate(tiny64, prompts, [SKIPPY], 4, progress=False,
                    generate_kwargs={"temperature": 1.0})
    with pytest.raises(ValueError, match="head \\+ tail"):
        ev.evaluate(tiny64, prompts, [DepthSchedule(alpha=0.9, head=5, tail=5)], 4,
                    progress=False)


# ---- weight formats (issue 13 §2) ---------------------------------------------------------------

FORMATS = ["auto", "none", "int8", "int4:32"]  # the tiny preset's K = 96: int4's 128 does not fit


@pytest.fixture(scope="module")
def format_results(tiny64, prompts, held):
    return ev.evaluate(tiny64, prompts, [DepthSchedule(alpha=1.0)], N_NEW, held, progress=False,
                       formats=FORMATS)


def _reference_nll(model, prompts, outputs):
    """Mean NLL per token of outputs after prompts under the float64 oracle on the model's
    dequantized weights."""
    nll = []
    for p, gen in zip(prompts, outputs):
        logits = reference.llama_forward(model.dequantized_state_dict(), model.config,
                                         torch.tensor([p + gen]))[0]
        lp = torch.log_softmax(logits, -1)
        nll += [-float(lp[len(p) - 1 + k, t]) for k, t in enumerate(gen)]
    return sum(nll) / len(nll)


def test_format_rows_follow_the_schedules(format_results):
    assert len(format_results) == 1 + len(FORMATS)
    assert format_results[0].weights is None
    assert [r.weights for r in format_results[1:]] == ["float64", "float64", "int8 g96",
                                                       "int4 g32"]
    assert all(r.schedule.is_full_depth and r.layer_ratio == 1.0 for r in format_results)


def test_float_weights_row_is_exactly_the_float_model(format_results, tiny64, prompts, held):
    """"none" on a float model (and "auto", its own float weights): the same replies, ΔNLL 0."""
    full = tiny64.generate(prompts, N_NEW, None).tokens
    for r in format_results[1:3]:
        assert r.tokens == full and r.exact_match == 1.0
        assert r.first_divergence == [None] * len(prompts)
        assert r.delta_nll == 0.0 and r.held_ppl == r.full_held_ppl
        assert r.work_ratio == 1.0
        assert r.full_nll == pytest.approx(_reference_nll(tiny64, prompts, full), rel=1e-9)
        assert r.decode_tokens_per_s > 0 and r.full_decode_tokens_per_s > 0


@pytest.mark.parametrize("index, fmt, group", [(3, "int8", None), (4, "int4", 32)])
def test_quantized_rows_match_independent_computation(format_results, tiny64, prompts, held,
                                                      index, fmt, group):
    """A quantized row: the float model's replies scored by the oracle on the quantized
    model's dequantized weights, its own greedy replies compared with the float model's."""
    r = format_results[index]
    q = LlamaD3(tiny64.config, tiny64.state_dict(), dtype=torch.float64, quantize=fmt,
                group_size=group)
    assert r.weights == q.weight_format
    full = tiny64.generate(prompts, N_NEW, None).tokens
    assert r.full_nll == pytest.approx(_reference_nll(tiny64, prompts, full), rel=1e-9)
    assert r.nll == pytest.approx(_reference_nll(q, prompts, full), rel=1e-9)
    out = q.generate(prompts, N_NEW, None).tokens
    assert r.tokens == out
    div = [None if a == b else next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
           for a, b in zip(out, full)]
    assert r.first_divergence == div
    assert r.exact_match == sum(d is None for d in div) / len(div)
    held_nll = nll_of(q, held[:1], held[1:])
    assert r.held_ppl == pytest.approx(math.exp(sum(held_nll) / len(held_nll)), rel=1e-9)
    assert r.full_held_ppl == format_results[1].held_ppl
    # bytes per full-depth step: float64 weights over the format's
    assert r.work_ratio == pytest.approx(tiny64.weight_bytes.layer / q.weight_bytes.layer,
                                         rel=0.1)


def test_quantized_rows_lose_a_little_and_int4_more(format_results):
    int8, int4 = format_results[3], format_results[4]
    assert math.isfinite(int8.delta_nll) and 0 < abs(int8.delta_nll) < 0.05
    assert math.isfinite(int4.delta_nll) and int4.delta_nll != int8.delta_nll
    assert int4.work_ratio > int8.work_ratio > 1.0


def test_with_weights(tiny64):
    assert ev.with_weights(tiny64, "auto") is tiny64
    int4 = ev.with_weights(LlamaD3.random("tiny", seed=1), "int4")
    assert int4.weight_format == "int4 g32"  # 128 and 64 do not divide K = 96
    assert int4.dtype == torch.float32 and int4.backend == tiny64.backend
    q = ev.with_weights(ev.with_weights(tiny64, "int8", 32), None)  # dequantize a quantized one
    assert q.weight_format == "float64"
    with pytest.raises(ValueError, match="group_size 64"):
        ev.with_weights(tiny64, "int4", 64)


@pytest.mark.parametrize("spec, want", [("auto", ("auto", None)), ("none", (None, None)),
                                        ("int8", ("int8", None)), ("int4:32", ("int4", 32)),
                                        ("int8:128", ("int8", 128))])
def test_parse_format(spec, want):
    assert ev.parse_format(spec) == want


@pytest.mark.parametrize("spec", ["int3", "float32", "none:32", "auto:64", "int4:48", "int4:",
                                  "int8:x", ""])
def test_parse_format_rejects(spec):
    with pytest.raises(ValueError, match="weight format must be one of"):
        ev.parse_format(spec)


def test_evaluate_rejects_bad_formats_before_decoding(tiny64, prompts, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before rejecting the format")

    monkeypatch.setattr(tiny64, "generate", no_decoding)
    with pytest.raises(ValueError, match="weight format"):
        ev.evaluate(tiny64, prompts, [SKIPPY], 4, progress=False, formats=["int8", "int3"])
    with pytest.raises(ValueError, match="group_size 128"):
        ev.evaluate(tiny64, prompts, [SKIPPY], 4, progress=False, formats=["int4:128"])


def test_format_rows_in_csv_table_and_budget(results, format_results, tmp_path):
    rows = list(csv.DictReader(ev.write_csv(format_results, tmp_path / "f.csv").open()))
    assert list(rows[0]) == [*ev.CSV_FIELDS, "weights"]
    assert [row["weights"] for row in rows] == ["", "float64", "float64", "int8 g96", "int4 g32"]
    assert float(rows[4]["delta_nll"]) == pytest.approx(format_results[4].delta_nll)
    table = ev.format_table(format_results).splitlines()
    assert len(table) == 2 + 1 + len(format_results)
    assert table[3].startswith("-- weight formats") and table[6].startswith("weights int8 g96")
    with pytest.raises(ValueError, match="not both"):
        ev.best_under_budget(format_results, min_agreement=0.0)
    best = ev.best_under_budget(format_results[1:], max_nll_increase=10.0)
    assert best.weights is not None
    # no formats: no weights column or lines (today's output)
    rows = list(csv.DictReader(ev.write_csv(results, tmp_path / "d3.csv").open()))
    assert list(rows[0]) == list(ev.CSV_FIELDS)
    assert "weights" not in ev.format_table(results)
    pytest.importorskip("matplotlib")
    png = ev.plot(format_results, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("formats", [None, ["none", "int8"]])
def test_cli_eval_formats_plumbing(formats, tiny64, prompts, held, tmp_path, monkeypatch,
                                   capsys):
    """The eval subcommand on the tiny model (ids for prompts and held text): --formats adds
    the weight rows to the table, CSV and budget lines; without it the output is today's."""
    from d3kernels import cli

    monkeypatch.setattr(cli, "_load", lambda args: tiny64)
    monkeypatch.setattr(ev, "load_prompts", lambda path=None: prompts)
    monkeypatch.setattr(ev, "load_held_text", lambda path=None: held)
    argv = ["eval", "--alphas", "1", "0.8", "--heads", "1", "--tails", "1", "--max-new-tokens",
            "6", "--out", str(tmp_path), "--quiet", "--max-nll-increase", "10"]
    assert cli.main(argv + (["--formats", *formats] if formats else [])) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert "-- best under budget" in out
    if formats is None:
        assert len(rows) == 2 and list(rows[0]) == list(ev.CSV_FIELDS)
        assert "weights" not in out
    else:
        assert [row["weights"] for row in rows] == ["", "", "float64", "int8 g96"]
        assert "-- weight formats at full depth" in out and "weights int8 g96" in out
        assert "-- best weights under budget (ΔNLL <= 10): " in out


# ---- choosing, writing, plotting ----------------------------------------------------------------

def fake(alpha, match, dnll, speed, work=1.0):
    return ev.ScheduleResult(DepthSchedule(alpha=alpha), exact_match=match,
                             first_divergence=[None], nll=dnll, full_nll=0.0,
                             held_ppl=None, full_held_ppl=None, layer_ratio=1.0,
                             work_ratio=work, decode_tokens_per_s=speed,
                             full_decode_tokens_per_s=1.0, mean_new_tokens=8.0,
                             full_lengths=[8])


def test_best_under_budget_on_hand_made_results():
    rs = [fake(1.0, 1.0, 0.0, 1.0), fake(0.99, 0.75, 0.05, 1.2), fake(0.98, 0.5, 0.2, 1.5),
          fake(0.95, 0.25, 0.8, 1.9), fake(0.97, 0.6, 0.1, 1.3)]
    assert ev.best_under_budget(rs, max_nll_increase=0.1).schedule.alpha == 0.97
    assert ev.best_under_budget(rs, max_nll_increase=0.05).schedule.alpha == 0.99
    assert ev.best_under_budget(rs, max_nll_increase=1.0).schedule.alpha == 0.95
    assert ev.best_under_budget(rs, min_agreement=0.5).schedule.alpha == 0.98
    assert ev.best_under_budget(rs, min_agreement=0.7).schedule.alpha == 0.99
    assert ev.best_under_budget(rs, max_nll_increase=0.3, min_agreement=0.55).schedule.alpha \
        == 0.97
    assert ev.best_under_budget(rs[1:], min_agreement=0.9) is None
    with pytest.raises(ValueError):
        ev.best_under_budget(rs)
    # equal realized speedup: the larger work ratio wins
    tie = [fake(0.9, 1.0, 0.0, 1.5, work=1.2), fake(0.8, 1.0, 0.0, 1.5, work=1.4)]
    assert ev.best_under_budget(tie, min_agreement=1.0).schedule.alpha == 0.8


def test_pareto_front():
    rs = [fake(1.0, 1.0, 0.0, 1.0), fake(0.99, 0.5, 0.3, 1.2), fake(0.98, 0.8, 0.1, 1.3),
          fake(0.95, 0.1, 1.0, 2.0)]
    assert ev.pareto_front(rs, "delta_nll") == [0, 2, 3]  # 0.99 is beaten by 0.98
    assert ev.pareto_front(rs, "exact_match") == [0, 2, 3]


def test_csv_and_png_are_written(results, tmp_path):
    path = ev.write_csv(results, tmp_path / "sub" / "eval.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(results)
    assert list(rows[0]) == list(ev.CSV_FIELDS)
    assert rows[0]["alpha"] == "1.0" and rows[0]["exact_match"] == "1.0"
    assert rows[0]["delta_nll"] == "0.0" and rows[0]["min_depth"] == ""
    assert rows[1]["order"] == "upper" and float(rows[1]["realized_speedup"]) > 0
    assert rows[2]["min_depth"] == "4"
    assert float(rows[1]["delta_nll"]) == pytest.approx(results[1].delta_nll)
    pytest.importorskip("matplotlib")
    png = ev.plot(results, tmp_path / "eval.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_format_table_and_grid(results):
    table = ev.format_table(results).splitlines()
    assert len(table) == 2 + len(results) and "full depth" in table[2]
    grid = ev.schedule_grid([1, 0.99], orders=["lower", "upper"], starts=[0, 2])
    assert len(grid) == 1 + 4 and grid[0].is_full_depth  # alpha = 1 appears once


def test_shipped_data(tmp_path):
    prompts = ev.load_prompts()
    assert len(prompts) == 12 and all(10 < len(p) < 200 for p in prompts)
    assert len(ev.load_held_text().split()) >= 300
    readme = (ev.DATA_DIR / "README.md").read_text()
    assert "written for d3kernels, Apache-2.0" in readme
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\nfirst\n  second  \n")
    assert ev.load_prompts(f) == ["first", "second"]
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        ev.load_prompts(f)


# ---- the CLI on the real model ------------------------------------------------------------------

def test_cli_eval_end_to_end_on_smollm2(smollm2_gguf_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "d3kernels", "eval", "--limit", "2",
                        "--max-new-tokens", "8", "--alphas", "1", "0.95", "--out", str(tmp_path),
                        "--min-agreement", "0.9", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "full depth (a=1)" in out and "a=0.95 lower" in out
    # alpha = 1 agrees with itself, so it is within any agreement budget
    assert "-- best under budget (exact match >= 0.9):" in out
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert [row["alpha"] for row in rows] == ["1.0", "0.95"]
    assert rows[0]["exact_match"] == "1.0" and float(rows[0]["delta_nll"]) == 0.0
    assert float(rows[0]["held_ppl"]) == float(rows[0]["full_held_ppl"])
    assert float(rows[1]["layer_ratio"]) > 1.0
    if (tmp_path / "eval.png").exists():
        assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--alphas", "1", "1.5"], "alpha"),
    (["--min-depths", "3"], "min_depth"),
    (["--max-new-tokens", "1"], "max-new-tokens"),
    (["--min-agreement", "2"], "min-agreement"),
    (["--prompts", "/no/such/prompts.txt"], "/no/such/prompts.txt"),
    (["--formats", "int8", "int3"], "--formats"),
    (["--formats", "int4:48"], "int4:G"),
])
def test_cli_eval_bad_arguments_exit_2_before_loading(args, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "d3kernels", "eval", *args, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert "loading" not in r.stderr  # rejected before the model is read


def test_describe_names_schedules_apart():
    assert ev.describe(DepthSchedule.full()) == "full depth (a=1)"
    assert ev.describe(DepthSchedule(alpha=0.99, start=2, head=1, tail=1)) == \
        "a=0.99 lower start=2 h/t=1/1"
    calibrated = DepthSchedule(alpha=0.98, order=(17, 18, 16, 5, 14))
    assert ev.describe(calibrated) == "a=0.98 order 17,18,16,…"
