import json
from dataclasses import replace

import pytest

from distillab.bench.throughput import ThroughputSpec, default_output, measure, parse_shape
from distillab.cli import main
from distillab.errors import ConfigError


def _tiny(**kw) -> ThroughputSpec:
    return ThroughputSpec(teacher="resnet8", student="resnet8", methods=["kd", "fitnet"], input_shape=(1, 8, 8),
                          num_classes=10, batch=8, warmup=1, steps=2, **{"repeats": 2, **kw})


def test_throughput_reports_every_method_against_the_bound(capsys):
    result = measure(_tiny())
    out = capsys.readouterr().out.splitlines()  # a line per measurement, the methods counted k of N
    assert [line.split(":")[0] for line in out if line.startswith("[")] == ["[1/2] kd", "[2/2] fitnet"]
    assert sum(line.startswith("teacher forward: ") for line in out) == 2  # the bound, before and after
    bound = result["bound"]
    for part in ("before", "after"):
        student, teacher = bound[part]["student_step"]["images_per_s"], bound[part]["teacher_forward"]["images_per_s"]
        # the bound is the harmonic combination: seconds per image of a student step plus a teacher forward
        assert bound[part]["images_per_s"] == pytest.approx(1 / (1 / student + 1 / teacher))
        assert bound[part]["images_per_s"] < min(student, teacher)
    mean = (bound["before"]["images_per_s"] + bound["after"]["images_per_s"]) / 2
    assert bound["images_per_s"] == pytest.approx(mean)
    # counted FLOPs (convolutions and matmuls): KD's loss adds none, so kd = student step + teacher forward,
    # and FitNet's regressor adds some
    parts = bound["before"]
    kd, fitnet = result["methods"]["kd"]["gflops_per_image"], result["methods"]["fitnet"]["gflops_per_image"]
    assert kd == pytest.approx(parts["student_step"]["gflops_per_image"] + parts["teacher_forward"]["gflops_per_image"])
    assert fitnet > kd > 0
    assert list(result["methods"]) == ["kd", "fitnet"]
    for name, row in result["methods"].items():
        assert len(row["all_images_per_s"]) == 2 and row["images_per_s"] > 0
        assert row["ratio_to_bound"] == pytest.approx(row["images_per_s"] / bound["images_per_s"])
        assert (row["side_params"] > 0) == (name == "fitnet")
        assert row["peak_memory_mb"] is None  # CPU: not measured
    assert result["environment"]["threads"] >= 1 and result["spec"]["input_shape"] == [1, 8, 8]


def test_the_view_cached_mode_reads_the_teacher_from_its_cache():
    """With teacher views a caching method's step runs no teacher forward (its counted FLOPs are the student
    step's); a method that cannot use the cache (mlkd: a strong view) still runs the teacher."""
    result = measure(replace(_tiny(teacher_views=2, repeats=1), methods=["kd", "mlkd"]))
    kd, student = result["methods"]["kd"], result["bound"]["before"]["student_step"]
    assert kd["gflops_per_image"] == pytest.approx(student["gflops_per_image"])
    assert kd["cache_mib"] == pytest.approx(2 * 8 * 3 * 10 * 4 / 2**20) and kd["cache_build_s"] > 0
    assert "cache_mib" not in result["methods"]["mlkd"]
    assert result["methods"]["mlkd"]["gflops_per_image"] > kd["gflops_per_image"]


def test_throughput_command_writes_json(tmp_path, capsys):
    out = tmp_path / "tp.json"
    code = main(["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--methods", "ce,dkd",
                 "--input", "1x8x8", "--num-classes", "10", "--batch", "8", "--warmup", "1", "--steps", "1",
                 "--repeats", "1", "--option", "dkd.nckd_weight=2", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["methods"]) == ["ce", "dkd"] and result["spec"]["options"] == {"dkd": {"nckd_weight": 2}}
    assert result["spec"]["channels_last"] is True  # training's default
    assert "x bound" in capsys.readouterr().out
    again = ["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--methods", "ce",
             "--input", "1x8x8", "--num-classes", "10", "--batch", "8", "--warmup", "1", "--steps", "1",
             "--repeats", "1", "--no-channels-last", "--output", str(out)]
    before = out.read_text()
    assert main(again) == 2  # an existing results file is kept ...
    assert "pass --force to overwrite it" in capsys.readouterr().err and out.read_text() == before
    assert main([*again, "--force"]) == 0  # ... unless --force says otherwise
    assert json.loads(out.read_text())["spec"]["channels_last"] is False


def test_throughput_default_output_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--methods", "ce",
            "--input", "1x8x8", "--num-classes", "10", "--batch", "8", "--warmup", "1", "--steps", "1",
            "--repeats", "1"]
    assert main(argv) == 0 and main(argv) == 0
    written = sorted(p.name for p in (tmp_path / "results" / "throughput").iterdir())
    assert written == ["resnet8_resnet8_1x8x8_b8_cpu_auto.json", "resnet8_resnet8_1x8x8_b8_cpu_auto_2.json"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "kd,nosuch"], "unknown method"),
    (["--input", "32x32"], "expected CxHxW"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--option", "kd=3"], "expected METHOD.KEY=VALUE"),
])
def test_throughput_bad_arguments_are_one_line_errors(argv, message, capsys):
    code = main(["bench", "throughput", "--teacher", "resnet8", "--student", "resnet8", "--input", "1x8x8", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parse_shape():
    assert parse_shape("3x32x32") == (3, 32, 32)
    with pytest.raises(ConfigError):
        parse_shape("3x0x32")


def test_default_output_names_what_differs_from_training_defaults():
    spec = ThroughputSpec(teacher="resnet32x4", student="resnet8x4", methods=["kd"])
    assert default_output(spec).name == "resnet32x4_resnet8x4_3x32x32_b64_cpu_auto.json"
    other = replace(spec, compile=True, channels_last=False, amp="off", batch=256)
    assert default_output(other).name == "resnet32x4_resnet8x4_3x32x32_b256_cpu_off_compile_nchw.json"
