"""The command line and the set-ups a newcomer meets first: --version and help texts, argument
errors before any heavy import, where `fastrlhf bench` writes, how `fastrlhf report` groups,
and what the main-job set-up installs."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# Generous: these answer in well under a second on an idle machine (measured with `time`); the
# bound only has to catch a regression that imports torch (seconds) under a loaded CI machine.
FAST_S = 20.0


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _cli(*args, env=None, cwd=ROOT):
    """Run `fastrlhf ARGS` in a fresh interpreter; return (rc, stdout, stderr, torch_imported)."""
    code = textwrap.dedent(f"""
        import sys
        from fastrlhf import cli
        try:
            rc = cli.main({list(args)!r})
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        print("\\nTORCH_IMPORTED=%s" % ("torch" in sys.modules), file=sys.stderr)
        sys.exit(rc)
    """)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                       env=env or _env(), timeout=300)
    elapsed = time.perf_counter() - t0
    m = re.search(r"TORCH_IMPORTED=(True|False)", p.stderr)
    assert m, p.stderr[-2000:]
    return p.returncode, p.stdout, p.stderr.replace(m.group(0), "").strip(), m.group(1) == "True", elapsed


def test_version():
    from fastrlhf import __version__
    rc, out, err, torch_imported, elapsed = _cli("--version")
    assert rc == 0 and out.strip() == f"fastrlhf {__version__}", (out, err)
    assert not torch_imported and elapsed < FAST_S


@pytest.mark.parametrize("args, message", [
    (("train", "--backend", "nope"), "invalid choice: 'nope'"),
    (("train", "--total-steps", "0"), "TrainConfig.total_steps must be an integer >= 1"),
    (("train", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    (("bench", "--only", "nope"), "invalid choice: 'nope'"),
    (("bench", "--device", "tpu"), "expected cpu, cuda or cuda:N"),
    (("bench", "--out", "x.json", "--write"), "not allowed with argument"),
    (("report", "--bogus"), "unrecognized arguments: --bogus"),
    (("no-such-command",), "unknown command 'no-such-command'"),
])
def test_argument_errors_come_before_heavy_imports(args, message):
    rc, out, err, torch_imported, elapsed = _cli(*args)
    assert rc == 2, (out, err)
    assert message in err, err
    assert not torch_imported, f"{args}: torch was imported before the argument error"
    assert elapsed < FAST_S, f"{args}: {elapsed:.1f} s"


@pytest.mark.parametrize("cmd", [(), ("train",), ("bench",), ("report",)])
def test_help_texts_are_clean(cmd):
    rc, out, err, torch_imported, _ = _cli(*cmd, "--help")
    assert rc == 0, err
    assert not torch_imported
    prog = " ".join(("fastrlhf",) + cmd)
    assert out.startswith(f"usage: {prog} "), out[:200]
    for markup in ("``", ":class:", ":func:", ":mod:", "python bench/report.py"):
        assert markup not in out, f"{prog} --help shows {markup!r}"
    if cmd == ():
        assert "--version" in out and all(c in out for c in ("train", "bench", "report"))
    if cmd == ("bench",):
        names = sorted(f[6:-3] for f in os.listdir(BENCH) if re.fullmatch(r"bench_\w+\.py", f))
        assert names and all(n in out for n in names), "bench --help must list --only's choices"
        assert "--write" in out and "--out" in out
    if cmd == ("train",):
        flat = " ".join(out.split())
        assert "--backend {auto,triton,native,reference}" in flat
        assert "--kl-loss-kind {k1,kl,abs,k2,mse,k3,low_var_kl}" in flat
        assert "--clip-high FLOAT|none" in flat and "the word none for None" in flat


def test_train_none_and_choices_parse():
    from fastrlhf.trainer.cli import build_parser, config_from_args
    args = build_parser().parse_args(["--clip-high", "none", "--dual-clip", "3", "--loss-agg",
                                      "seq-mean-token-mean", "--model", "none"])
    cfg = config_from_args(args)
    assert cfg.clip_high is None and cfg.dual_clip == 3.0 and cfg.model is None
    assert cfg.loss_agg == "seq-mean-token-mean"


def test_import_fastrlhf_is_light_and_ops_load_on_use():
    code = ("import sys, fastrlhf; assert 'torch' not in sys.modules, 'torch imported';"
            "f = fastrlhf.token_logprobs; assert 'torch' in sys.modules and callable(f);"
            "assert set(fastrlhf.__all__) <= set(dir(fastrlhf));"
            "import torch; print(float(f(torch.zeros(2, 5), torch.tensor([1, 2])).sum()))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert abs(float(p.stdout.strip()) - 2 * -1.6094379) < 1e-5


# ------------------------------------------------------------------------------ set-ups

HEAVY = ("ray", "deepspeed", "verl", "openrlhf", "trl", "liger-kernel", "liger_kernel", "datasets",
         "pyarrow", "pandas", "triton")


def _req_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower()


def test_main_job_setup_installs_no_heavy_packages():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)["project"]
    extras = proj["optional-dependencies"]
    main_job = [_req_name(r) for r in proj["dependencies"] + extras["train"]]
    assert "torch" in main_job and "transformers" in main_job
    assert not set(main_job) & set(HEAVY), set(main_job) & set(HEAVY)
    # Triton only where a GPU is: the [triton] extra
    assert [_req_name(r) for r in extras["triton"]] == ["triton"]
    # the test set-up keeps what the tests need
    assert "triton" in [_req_name(r) for r in extras["test"]]
    assert {"trl", "liger-kernel"} <= {_req_name(r) for r in extras["integrations"]}
    # and scripts/setup.sh --train installs exactly fastrlhf[train] (+ [triton] with a GPU)
    script = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    train_branch = script.split('if [ "$MODE" = train ]; then', 1)[1].split("\nelse\n", 1)[0]
    installs = re.findall(r"pip install (.+)", train_branch)
    assert installs == ['-q -e ".[train,triton]"', '-q -e ".[train]"'], installs
    for pkg in HEAVY:
        assert not re.search(rf"\b{re.escape(pkg)}\b", " ".join(installs)) or pkg == "triton"


def test_readme_shows_both_setups_one_line_each():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "bash scripts/setup.sh --train && .venv/bin/fastrlhf train" in readme
    test_cmd = [ln for ln in ci.splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(test_cmd) == 1 and "scripts/setup.sh --test" in test_cmd[0]
    assert test_cmd[0].strip() in readme
    # no stale text, nothing outside the repository
    assert "later)" not in readme and "DESIGN.md" not in readme
    # every shell command shown runs from the venv (no bare `fastrlhf` / `torchrun` / `python`)
    # (code lines: fenced or indented; `source .venv/bin/activate` above a block puts them there)
    fenced = False
    activated = False
    for ln in readme.splitlines():
        if ln.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or ln.startswith("    ")):
            activated = False
            continue
        cmd = ln.strip()
        activated |= cmd.startswith("source .venv/bin/activate")
        if re.match(r"(fastrlhf|torchrun|python|pytest)\b", cmd) and not activated:
            pytest.fail(f"README shows a command that is not on PATH after the set-up: {cmd}")


# ------------------------------------------------------------------------------ benchmarks

@pytest.fixture()
def fake_bench(tmp_path):
    """A bench/ directory with the real harness and one tiny benchmark."""
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(os.path.join(BENCH, "common.py"), d / "common.py")
    shutil.copy(os.path.join(BENCH, "report.py"), d / "report.py")
    (d / "bench_tiny.py").write_text(textwrap.dedent("""
        import torch, common
        def run(device, quick):
            x = torch.ones(16)
            row = dict(op="sum", impl="eager", mode="fwd", shape="16", dtype="fp32", bytes=64)
            row.update(common.time_stats(lambda: x.sum(), device, warmup=1, rep=5))
            return [row, dict(op="sum", impl="liger", mode="fwd", shape="16", dtype="fp32",
                              skipped=common.skip_reason(RuntimeError(
                                  "0 active drivers ([]). There should only be one."), device))]
    """))
    (d / "results").mkdir()
    committed = d / "results" / "cpu.json"
    committed.write_text('{"schema": 2, "benchmarks": {}}')
    return d


def test_bench_writes_a_new_file_and_committed_results_only_with_write(fake_bench, tmp_path):
    committed = fake_bench / "results" / "cpu.json"
    before = committed.read_text()
    out = tmp_path / "mine.json"
    code = textwrap.dedent(f"""
        import sys
        from fastrlhf import cli
        for args in (["bench", "--device", "cpu"], ["bench", "--device", "cpu"],
                     ["bench", "--device", "cpu", "--out", {str(out)!r}]):
            assert cli.main(args) == 0
        open({str(tmp_path / "between")!r}, "w").write(open({str(committed)!r}).read())
        assert cli.main(["bench", "--device", "cpu", "--write"]) == 0
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(FASTRLHF_BENCH_DIR=str(fake_bench)), cwd=str(tmp_path),
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "between").read_text() == before, "bench without --write changed results/"
    runs = sorted(os.listdir(fake_bench / "runs"))
    assert len(runs) == 2 and all(r.startswith("cpu-") for r in runs), runs  # a new file per run
    for path in [fake_bench / "runs" / r for r in runs] + [out, committed]:
        data = json.loads(path.read_text())
        assert data["schema"] == 2
        bench = data["benchmarks"]["tiny"]
        assert bench["env"]["device"] and bench["copy_gbps"] > 0
        timed, skipped = bench["rows"]
        assert timed["ms"] > 0 and timed["iqr_ms"] >= 0 and timed["repeats"] == 5
        assert timed["noisy"] in (True, False)
        assert skipped["skipped"] == "needs a GPU"


def test_finish_row_marks_noisy_rows():
    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    calm = common.finish_row({"ms": 10.0, "iqr_ms": 0.5}, 1.0)
    noisy = common.finish_row({"ms": 10.0, "iqr_ms": 9.0}, 1.0)
    unknown = common.finish_row({"ms": 10.0}, 1.0)
    assert calm["noisy"] is False and noisy["noisy"] is True and "noisy" not in unknown
    s = common.spread([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["ms"] == 3.0 and s["iqr_ms"] == 2.0 and s["repeats"] == 5
    assert common.spread([5.0])["iqr_ms"] is None
    assert common.skip_reason(RuntimeError("0 active drivers ([])."), "cpu") == "needs a GPU"
    assert "active drivers" in common.skip_reason(RuntimeError("0 active drivers"), "cuda")


def test_time_group_interleaves_and_isolates_a_failing_step():
    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    calls = []
    fail_at = {"c": 3}  # c raises on its third call (the first timed round, after two warm-ups)

    def make(name):
        def step():
            calls.append(name)
            if name in fail_at:
                fail_at[name] -= 1
                if fail_at[name] == 0:
                    raise RuntimeError("out of memory")
        return step
    rows = [dict(impl=n) for n in "abc"]
    dropped = []
    entries = [(rows[0], make("a"), lambda: dropped.append("a")), (rows[1], make("b")),
               (rows[2], make("c"))]
    common.time_group(entries, "cpu", warmup=2, rep=4, max_seconds=60)
    timed = calls[6:]  # after the warm-ups (a a b b c c)
    assert calls[:6] == list("aabbcc")
    # round 0: a b c (c fails); round 1 rotated by one among the live steps (a, b): b a; ...
    assert timed[:3] == list("abc") and timed[3:5] == list("ba") and timed[5:7] == list("ab")
    for r in rows[:2]:
        assert r["repeats"] == 4 and r["interleaved"] is True and r["ms"] >= 0
        assert "peak_mb" in r
        # the per-round times, in round order, whose median is the row's median
        assert len(r["round_ms"]) == 4 and r["ms"] == pytest.approx(
            statistics.median(r["round_ms"]), rel=1e-3, abs=1e-6)
    assert dropped == ["a"]  # the pre-hook runs before the peak-memory call
    assert rows[2]["skipped"].startswith("RuntimeError: out of memory")
    assert "ms" not in rows[2] and "interleaved" not in rows[2]
    # a group of one is timed the same way, without the interleaved mark
    alone = dict(impl="d")
    common.time_group([(alone, make("d"))], "cpu", warmup=1, rep=3, peak=False)
    assert alone["repeats"] == 3 and "interleaved" not in alone and "peak_mb" not in alone
    assert "round_ms" not in alone


def test_paired_speedups_pair_rounds_and_render_with_quartiles(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import common
        import report
    finally:
        sys.path.remove(BENCH)
    key = dict(op="x", mode="fwd+bwd", shape="8", dtype="bf16")
    # The machine halves its speed after round 2: eager's and the op's medians come from
    # different halves, the per-round ratios are 4 in every round but one.
    eager = dict(key, impl="eager", ms=20.0, round_ms=[10.0, 10.0, 20.0, 20.0, 20.0])
    fast = dict(key, impl="fast", ms=2.5, round_ms=[2.5, 2.5, 5.0, 5.0, 4.0])
    alone = dict(key, impl="alone", ms=4.0)  # timed by itself: no rounds to pair
    other = dict(key, shape="16", impl="fast", ms=1.0, round_ms=[1.0, 1.0])  # no eager row
    short = dict(key, impl="short", ms=2.0, round_ms=[2.0])  # one round: no spread
    rows = [eager, fast, alone, other, short]
    common.add_speedups(rows)
    assert fast["speedup_vs_eager"] == 8.0  # 20 / 2.5: medians of different machine states
    assert fast["paired_vs_eager"] == 4.0 and fast["paired_q"] == [4.0, 4.0]
    assert common.paired_ratios([10.0, 20.0, 30.0], [5.0, 10.0]) == [2.0, 2.0]
    for r in (eager, alone, other, short):
        assert "paired_vs_eager" not in r and "paired_q" not in r
    assert alone["speedup_vs_eager"] == 5.0 and "speedup_vs_eager" not in other
    # quartiles of uneven ratios (inclusive method): 2, 3, 4, 5, 6 -> 3 .. 5 around 4
    e2 = dict(key, impl="eager", ms=1.0, round_ms=[2.0, 3.0, 4.0, 5.0, 6.0])
    f2 = dict(key, impl="f", ms=1.0, round_ms=[1.0] * 5)
    common.add_speedups([e2, f2])
    assert f2["paired_vs_eager"] == 4.0 and f2["paired_q"] == [3.0, 5.0]
    env = {"commit": "aaa", "date": "2026-01-01T00:00:00Z", "device": "Machine A",
           "device_type": "cpu", "torch": "2.13.0", "triton": "3.9.0"}
    common.write_results(str(tmp_path / "r.json"), env, 20.0, {"b": rows})
    text = report.render(str(tmp_path))
    assert "| paired vs eager (q1-q3) |" in text
    line = next(ln for ln in text.splitlines() if "| fast |" in ln and "| 8 |" in ln)
    assert "| 4.0 (4.0-4.0) |" in line and "| 8.0 |" in line
    assert "paired vs eager (q1-q3): the median over the rounds" in text


OLD_FORMAT = {  # schema 1: one top-level environment, overwritten by each merge; no spread
    "commit": "bbb", "copy_gbps": 30.0, "date": "2026-01-02T00:00:00Z", "device": "Machine B",
    "device_type": "cpu", "torch": "2.13.0", "triton": "3.9.0",
    "benchmarks": {
        "a": {"env": {"commit": "aaa", "date": "2026-01-01T00:00:00Z", "device": "Machine A",
                      "device_type": "cpu", "torch": "2.13.0", "triton": "3.9.0"},
              "rows": [{"op": "x", "impl": "eager", "mode": "fwd", "shape": "8", "dtype": "fp32",
                        "ms": 2.0, "gbps": 5.0, "pct_copy_bw": 20.0},
                       {"op": "x", "impl": "liger", "mode": "fwd", "shape": "8", "dtype": "fp32",
                        "skipped": "RuntimeError: 0 active drivers ([]). There should only be one."}]},
        "b": {"env": {"commit": "bbb", "date": "2026-01-02T00:00:00Z", "device": "Machine B",
                      "device_type": "cpu", "torch": "2.13.0", "triton": "3.9.0"},
              "rows": [{"op": "y", "impl": "eager", "mode": "fwd", "shape": "8", "dtype": "fp32",
                        "ms": 7.0}]},
        "c": {"env": {"commit": "ccc", "date": "2026-01-03T00:00:00Z", "device": "Machine A",
                      "device_type": "cpu", "torch": "2.13.0", "triton": "3.9.0"},
              "rows": [{"op": "z", "impl": "eager", "mode": "fwd", "shape": "8", "dtype": "fp32",
                        "ms": 1.0, "tflops": 0.1}]},
    },
}


def test_migration_keeps_measured_values_and_invents_no_spread():
    sys.path.insert(0, BENCH)
    try:
        import common
    finally:
        sys.path.remove(BENCH)
    new = common.migrate(json.loads(json.dumps(OLD_FORMAT)))
    assert new["schema"] == 2 and set(new) == {"schema", "benchmarks"}
    for name, bench in OLD_FORMAT["benchmarks"].items():
        got = new["benchmarks"][name]
        assert got["env"] == bench["env"]
        for old_row, row in zip(bench["rows"], got["rows"], strict=True):
            assert {k: row[k] for k in old_row} == old_row
            if not old_row.get("skipped"):
                assert row["iqr_ms"] is None and "noisy" not in row
    a, b, c = (new["benchmarks"][k]["copy_gbps"] for k in "abc")
    assert a == 25.0   # recovered: 100 * gbps / pct_copy_bw, as its run computed it
    assert b == 30.0   # the run that wrote the top-level copy bandwidth
    assert c is None   # no way to know: not recorded
    assert common.migrate(new) == new


def test_report_never_mixes_machines(tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps(OLD_FORMAT))
    sys.path.insert(0, BENCH)
    try:
        import report
        text = report.render(str(tmp_path))
    finally:
        sys.path.remove(BENCH)
    sections = re.split(r"^#### ", text, flags=re.M)[1:]
    assert [s.splitlines()[0] for s in sections] == ["Machine A", "Machine B"]
    sec_a, sec_b = sections
    assert "**a**" in sec_a and "**c**" in sec_a and "**b**" not in sec_a
    assert "**b**" in sec_b and "**a**" not in sec_b and "**c**" not in sec_b
    # each run has its own line: versions, commit, copy bandwidth (or that it was not recorded)
    assert "commit aaa" in sec_a and "commit ccc" in sec_a and "commit bbb" in sec_b
    assert "copy bandwidth not recorded" in sec_a and "copy bandwidth 30.0 GB/s" in sec_b
    assert "liger: needs a GPU" in sec_a and "active drivers" not in text
    assert "IQR ms" in text and "| n/m |" in text
