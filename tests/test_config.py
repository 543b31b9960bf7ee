from pathlib import Path

import pytest

from distillab import methods
from distillab.config import ScheduleConfig
from distillab.config_files import load_config
from distillab.engine.schedule import learning_rate
from distillab.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = "student: {name: resnet8}\n"


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.optim.lr=1e-3", "seed=3", "train.schedule.milestones=[1, 2]",
                                             "train.epochs=4"])
    assert cfg.train.optim.lr == pytest.approx(1e-3)
    assert cfg.seed == 3 and cfg.train.schedule.milestones == [1, 2]


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (BASE + "trian: {epochs: 3}\n", [], r"trian: unknown key; did you mean 'train'"),
        (BASE, ["train.epochs=-1"], r"train\.epochs: Input should be greater than 0 \(got -1\)"),
        (BASE, ["train.optim.lr=fast"], r"train\.optim\.lr: .*valid number"),
        (BASE, ["train.optim.momentun=0.5"], r"train\.optim\.momentun: unknown key; did you mean 'momentum'"),
        (BASE, ["data.name=imagenet"], r"data\.name: unknown dataset .imagenet.; one of cifar10, cifar100, digits"),
        (BASE, ["train.epochs=10", "train.schedule.milestones=[5, 20]"], r"beyond epochs=10"),
        (BASE, ["train.schedule.milestones=[3, 2]"], r"increase strictly"),
        ("teacher: {name: resnet20}\n", [], r"student: Field required"),
        (BASE, ["train.epochs"], r"expected key=value"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(write(tmp_path, "student: {name: resnet8}\n  bad: [\n"))


def test_step_schedule_follows_the_cifar_protocol():
    cfg = ScheduleConfig()  # default milestones at 240 epochs: 150, 180, 210; gamma 0.1
    lr = {e + 1: learning_rate(cfg, 0.05, e, 0, 782, 240) for e in range(240)}
    assert lr[1] == lr[150] == pytest.approx(0.05)
    assert lr[151] == lr[180] == pytest.approx(0.005)
    assert lr[181] == lr[210] == pytest.approx(5e-4)
    assert lr[211] == lr[240] == pytest.approx(5e-5)


def test_cosine_schedule_with_warmup():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, min_lr=0.0)
    steps = 10
    # first step: cosine at progress 0 is the base LR, times the warm-up factor (0 + 1/10) / 2
    assert learning_rate(cfg, 0.1, 0, 0, steps, 20) == pytest.approx(0.005)
    mid = learning_rate(cfg, 0.1, 10, 0, steps, 20)
    assert mid == pytest.approx(0.05)
    assert learning_rate(cfg, 0.1, 19, steps - 1, steps, 20) < 0.001


def test_base_files_are_merged_key_by_key(tmp_path):
    (tmp_path / "common.yaml").write_text("student: {name: resnet8}\ntrain: {epochs: 7, batch_size: 32}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: common.yaml\ntrain: {epochs: 3}\nmethod: {name: ce}\n")
    cfg = load_config(child)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.student.name) == (3, 32, "resnet8")


def test_missing_base_is_named(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: nowhere.yaml\nstudent: {name: resnet8}\n")
    with pytest.raises(ConfigError, match=r"base config .*nowhere\.yaml does not exist"):
        load_config(child)


def test_default_milestones_scale_with_the_run():
    cfg = ScheduleConfig()
    lrs = [learning_rate(cfg, 1.0, e, 0, 10, 8) for e in range(8)]  # milestones 5, 6, 7
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 0.1, 0.01, 0.001])


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                                        if not p.name.startswith("_")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_and_its_method_options_validate(path):
    cfg = load_config(path)  # method options included: checked against the method's Options model
    assert cfg.method.name


@pytest.mark.parametrize(("method", "old", "new"), [("rdr", "beta", "rdr_weight"), ("rdr", "kd_T", "temperature"),
                                                    ("dkd", "alpha", "tckd_weight"), ("dist", "tau", "temperature"),
                                                    ("dfa", "gamma_fd", "fd_weight")])
def test_renamed_options_keep_their_old_names_for_a_release(tmp_path, method, old, new):
    path = tmp_path / "run.yaml"
    path.write_text(f"student: {{name: resnet8}}\nmethod: {{name: {method}, options: {{{old}: 3.0}}}}\n")
    with pytest.warns(FutureWarning, match=f"method option {old} is deprecated: it is now {new}"):
        cfg = load_config(path)
    assert cfg.method.options == {new: 3.0}  # runs compare by today's names
    path.write_text(f"student: {{name: resnet8}}\nmethod: {{name: {method}, options: {{{old}: 3.0, {new}: 2.0}}}}\n")
    with pytest.raises(ConfigError, match=f"method.options.{old} is the old name of {new}: give {new} only"):
        load_config(path)


def test_a_run_saved_with_an_old_option_name_is_the_same_config(tmp_path):
    from distillab.run import same_config

    saved = tmp_path / "config.yaml"
    saved.write_text("student: {name: resnet8}\nmethod: {name: dkd, options: {beta: 2, warmup: 2}}\n")
    new = tmp_path / "new.yaml"
    new.write_text("student: {name: resnet8}\nmethod: {name: dkd, options: {nckd_weight: 2.0, warmup: 2}}\n")
    assert same_config(saved, load_config(new))
    new.write_text("student: {name: resnet8}\nmethod: {name: dkd, options: {nckd_weight: 6.0, warmup: 2}}\n")
    assert not same_config(saved, load_config(new))


def test_a_method_option_set_to_its_default_is_the_same_config(tmp_path):
    """A tuned value equal to the default trains the same run: a suite may reuse the run made without it."""
    from distillab.run import same_config

    saved = tmp_path / "config.yaml"
    saved.write_text("student: {name: resnet8}\nmethod: {name: fitnet}\n")
    default = methods.get("fitnet").Options().hint_weight
    assert same_config(saved, load_config(tmp_path / "config.yaml", [f"method.options.hint_weight={default}"]))
    assert not same_config(saved, load_config(tmp_path / "config.yaml", [f"method.options.hint_weight={default / 10}"]))
