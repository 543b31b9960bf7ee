"""DFA (spec shared/methods/dfa.md §9): aggregation, bridge loss, search steps and split, stage-2 weights, CLI."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import fit_to_digits, teacher_changes, tiny_config
from distillab import methods, models
from distillab.bench.suite import load_suite
from distillab.cli import main
from distillab.config import TrainConfig
from distillab.config_files import load_config
from distillab.data import DataSplits, ImageDataset
from distillab.engine.checkpoint import CHECKPOINT_FILE, STUDENT_FILE, load_checkpoint, save_safetensors
from distillab.engine.trainer import Trainer
from distillab.errors import ConfigError
from distillab.features import FeatureTap
from distillab.methods.base import validate_options
from distillab.methods.dfa import DFA, aggregate
from distillab.methods.dfa_search import split_halves, unit_distance
from distillab.roles import roles

SHAPE = (1, 16, 16)  # stages at 16, 8 and 4 pixels
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*(ROOT / "configs/cifar100/dfa").glob("[!_]*.yaml"),
                  *(ROOT / "configs/fashion_mnist").glob("dfa*.yaml")])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast and does not fight the other jobs on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nets(seed=0):
    """A resnet14 teacher (2 blocks per stage: 2 candidates per group) and a resnet8 student."""
    torch.manual_seed(seed)
    teacher = models.build("resnet14", num_classes=10, in_channels=1)
    torch.manual_seed(seed + 1)
    return teacher, models.build("resnet8", num_classes=10, in_channels=1)


def searcher(**options):
    teacher, student = nets()
    torch.manual_seed(2)
    return methods.build("dfa_search", student, teacher, input_shape=SHAPE, **options)


def trainable_beta(search, group):
    """beta_i as a leaf that records its gradient (the method keeps it out of autograd between its own steps)."""
    return search.betas[group].requires_grad_()


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# ------------------------------------------------------------------------------------------ aggregation
def test_alpha_is_a_softmax_per_group_uniform_at_beta_zero():
    search = searcher()
    assert [a.tolist() for a in search.alphas()] == [[0.5, 0.5]] * 3
    with torch.no_grad():
        search.betas[1].copy_(torch.tensor([0.0, math.log(3.0)]))
    assert torch.allclose(search.alphas()[1], torch.tensor([0.25, 0.75]))
    assert all(math.isclose(a.sum().item(), 1.0, rel_tol=1e-6) for a in search.alphas())


def test_aggregate_is_the_weighted_sum_of_the_maps():
    maps = [torch.full((1, 2, 2, 2), v) for v in (1.0, 2.0, 4.0)]
    out = aggregate(maps, torch.tensor([0.5, 0.25, 0.25]))
    assert torch.equal(out, torch.full((1, 2, 2, 2), 0.5 + 0.5 + 1.0))


def test_candidates_are_the_block_outputs_of_each_stage_without_the_stem():
    teacher = models.build("wrn_28_4", num_classes=100)
    student = models.build("wrn_16_2", num_classes=100)
    method = methods.build("dfa", student, teacher, mode="average", fd_weight=1.0)
    assert method.groups.names == [[f"stages.{i}.{j}" for j in range(4)] for i in range(3)]  # N_i^T = 4
    assert method.groups.teacher_channels == [64, 128, 256] and method.groups.student_channels == [32, 64, 128]


def test_ablation_weights():
    teacher, student = nets()
    average = methods.build("dfa", student, teacher, input_shape=SHAPE, mode="average", fd_weight=1.0)
    assert [a.tolist() for a in average.alphas] == [[0.5, 0.5]] * 3
    last = methods.build("dfa", student, teacher, input_shape=SHAPE, mode="last", fd_weight=1.0)
    assert [a.tolist() for a in last.alphas] == [[0.0, 1.0]] * 3
    draws = [[a.tolist() for a in methods.build("dfa", student, teacher, input_shape=SHAPE, mode="random",
                                                random_seed=seed, fd_weight=1.0).alphas] for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    assert all(math.isclose(sum(a), 1.0, rel_tol=1e-6) and min(a) > 0 and a != [0.5, 0.5] for a in draws[0])


def test_last_mode_is_plain_feature_distillation_exactly():
    teacher, student = nets()
    method = methods.build("dfa", student, teacher, input_shape=SHAPE, mode="last", fd_weight=3.0).eval()
    x, y = batch()
    logits, terms = method(x, y)
    with torch.no_grad(), FeatureTap(teacher, roles(teacher).stage_names) as t_tap, \
            FeatureTap(student, roles(student).stage_names) as s_tap:
        teacher(x)
        expected_logits = student(x)
        expected = sum(F.mse_loss(c(s), t) for c, s, t in zip(method.connectors, s_tap.values(), t_tap.values(),
                                                               strict=True))  # Eq. 1, stage outputs
    assert torch.equal(terms["fd"].detach(), 3.0 * expected)
    assert torch.equal(terms["ce"].detach(), F.cross_entropy(expected_logits, y))
    assert torch.equal(logits.detach(), expected_logits)


def test_stage_taps_agree_with_forward_from():
    """The search reads the student's map at a group's end by its stage tap and continues it by forward_from."""
    _, student = nets()
    student.eval()
    x, _ = batch(4)
    with torch.no_grad(), FeatureTap(student, roles(student).stage_names) as tap:
        full = student(x)
        for i, stage_map in enumerate(tap.values()):
            assert torch.allclose(student.forward_from(i + 1, stage_map), full, atol=1e-6)


# ------------------------------------------------------------------------------------------ bridge loss
def test_st_loss_is_the_mean_of_two_minus_two_cos():
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]]).view(3, 2, 1, 1)
    a = torch.tensor([[0.0, 1.0], [6.0, 8.0], [-1.0, 0.0]]).view(3, 2, 1, 1)
    assert math.isclose(unit_distance(s, a).item(), (2.0 + 0.0 + 4.0) / 3, rel_tol=1e-6)  # cos 0, 1, -1
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    cos = F.cosine_similarity(s.flatten(1), a.flatten(1), dim=1)
    assert math.isclose(unit_distance(s, a).item(), (2 - 2 * cos).mean().item(), rel_tol=1e-5)
    assert math.isclose(unit_distance(7.0 * s, 0.01 * a).item(), unit_distance(s, a).item(), rel_tol=1e-5)
    assert 0.0 <= unit_distance(s, -s).item() <= 4.0 + 1e-6 and math.isclose(unit_distance(s, -s).item(), 4.0)


@pytest.mark.parametrize("group", [0, 1, 2])
def test_ts_path_reaches_beta_ts_and_the_later_student_stages_only(group):
    search = searcher()
    x, y = batch()
    beta = trainable_beta(search, group)
    search.bridge_terms(group, x, y, beta)[0]["ts"].backward()
    assert beta.grad.abs().sum() > 0 and search.ts[group].weight.grad.abs().sum() > 0
    student = search.student
    later = [*student.stages[group + 1 :].parameters(), *student.head.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in later)
    earlier = [*student.stem.parameters(), *student.stages[: group + 1].parameters()]
    assert all(p.grad is None or not p.grad.any() for p in earlier)
    assert all(p.grad is None for p in search.teacher.parameters())
    assert all(p.grad is None for p in search.st.parameters())


def test_st_path_reaches_beta_st_and_the_student_up_to_the_group():
    search = searcher()
    x, y = batch()
    beta = trainable_beta(search, 1)
    search.bridge_terms(1, x, y, beta)[0]["st"].backward()
    assert beta.grad.abs().sum() > 0 and search.st[1].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in search.student.stages[1].parameters())
    assert all(p.grad is None for p in search.student.stages[2].parameters())
    assert all(p.grad is None for p in search.teacher.parameters())


# ------------------------------------------------------------------------------------------ search steps
def test_beta_step_changes_only_beta_i_and_logs_each_paths_gradient():
    search = searcher()
    before = state(search)
    search.start_group(1)
    x, y = batch()
    search.beta_step(1, x, y)
    assert changed(before, state(search)) == {"betas.1"}  # student weights and BN statistics included
    logs = search.take_logs()
    assert set(logs) == {f"g1_{kind}_{j}" for kind in ("ts_grad", "st_grad", "alpha") for j in (0, 1)}
    assert search.take_logs() == {}  # taken once
    fresh = searcher()
    beta = trainable_beta(fresh, 1)
    terms, _ = fresh.bridge_terms(1, x, y, beta)
    assert torch.allclose(torch.stack([logs["g1_ts_grad_0"], logs["g1_ts_grad_1"]]),
                          torch.autograd.grad(terms["ts"], beta, retain_graph=True)[0])
    assert torch.allclose(torch.stack([logs["g1_st_grad_0"], logs["g1_st_grad_1"]]),
                          torch.autograd.grad(terms["st"], beta)[0])


def test_a_step_is_a_beta_step_then_the_w_loss_for_the_trainer():
    search = searcher(add_student_ce=True, epochs_per_group=2)
    search.train()
    search.set_progress(2, search.fixed_epochs)  # epoch 3 of 6: group 1
    before = state(search)
    x, y = batch()
    xb, yb = batch(seed=5)
    logits, terms = search(x, y, xb, yb)
    assert search.group == 1 and set(terms) == {"ts", "st", "ce"} and logits.shape == (8, 10)
    params = {n for n, _ in search.named_parameters()}
    assert changed(before, state(search)) & params == {"betas.1"}  # the beta-step (the w forward moved BN stats)
    sum(terms.values()).backward()  # the w-step's gradients: the Trainer's optimizer applies them
    grads = {n for n, p in search.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"ts.1.weight", "st.1.weight", "student.stem.conv.weight", "student.head.fc.weight"} <= grads
    assert not any(n.startswith(("betas.", "teacher.", "ts.0", "ts.2", "st.0", "st.2")) for n in grads)
    assert not any(p.requires_grad for p in search.teacher.parameters())
    assert not any(p.requires_grad for p in search.betas)  # never in the Trainer's optimizer
    assert search.fixed_epochs == 6 and searcher(epochs_per_group=2, warmup_epochs=1).fixed_epochs == 7


def indexed_dataset(n=40):
    """Images whose pixels all hold their own index, so a batch tells which images it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, *SHAPE).contiguous()
    return ImageDataset(images, torch.arange(n) % 10, 10, (0.0,), (1.0,), "indexed")


def test_the_trainer_alternates_the_halves_group_after_group():
    search = searcher(epochs_per_group=1, split_seed=3, warmup_epochs=1)
    w_half, beta_half = (set(h.tolist()) for h in split_halves(40, 3))
    calls = []

    def spy(kind, fn):
        def record(group, images, *rest):
            seen = set((images[:, 0, 0, 0] * 255).round().long().tolist())
            half = "w" if seen <= w_half else "beta" if seen <= beta_half else "both"
            calls.append((kind, group, half, seen, [b.detach().clone() for b in search.betas]))
            return fn(group, images, *rest)
        return record

    search.beta_step, search.bridge_terms = spy("beta_step", search.beta_step), spy("bridge", search.bridge_terms)
    cfg = TrainConfig(epochs=search.fixed_epochs, batch_size=4, progress=False, optim={"name": "sgd", "lr": 0.05},
                      schedule={"name": "constant"})
    Trainer(search, DataSplits(indexed_dataset(), None, indexed_dataset(8)), cfg, augment=None).fit()
    steps = 5  # one pass over the 20 images of D_w, 4 at a time; the warm-up epoch (plain CE) calls neither
    # every step: the beta-step on D_beta (which computes the bridge loss there), then the w-step's on D_w
    assert [c[:3] for c in calls] == [(kind, group, half) for group in range(3) for _ in range(steps)
                                      for kind, half in (("beta_step", "beta"), ("bridge", "beta"), ("bridge", "w"))]
    for _, group, _, _, betas in calls:
        for j in range(3):
            if j != group:  # the other groups stay where their own search left them
                assert torch.equal(betas[j], search.betas[j].detach() if j < group else torch.zeros(2))
    assert set().union(*(c[3] for c in calls if c[0] == "bridge" and c[1] == 0 and c[2] == "w")) == w_half


def test_split_is_disjoint_deterministic_and_half_and_half():
    w, beta = split_halves(50_000, 0)
    assert len(w) == len(beta) == 25_000
    assert torch.equal(torch.cat([w, beta]).sort().values, torch.arange(50_000))
    again, _ = split_halves(50_000, 0)
    other, _ = split_halves(50_000, 1)
    assert torch.equal(w, again) and not torch.equal(w, other)
    assert [len(h) for h in split_halves(11, 0)] == [5, 6]


# ------------------------------------------------------------------------------------------ stage 2
def write_aggregation(path, weights):
    path.write_text(json.dumps({"groups": [{"weights": w} for w in weights]}))
    return path


def test_searched_weights_are_fixed_buffers_kept_in_the_state_dict(tmp_path):
    teacher, student = nets()
    weights = [[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]
    method = methods.build("dfa", student, teacher, input_shape=SHAPE, fd_weight=1.0,
                           weights=write_aggregation(tmp_path / "aggregation.json", weights))
    assert torch.allclose(torch.stack(method.alphas), torch.tensor(weights))
    assert not any(name.startswith("alpha") for name, _ in method.named_parameters())
    assert {f"alpha_{i}" for i in range(3)} <= set(method.trainable_state_dict())
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0)
    sum(method(*batch())[1].values()).backward()
    optimizer.step()
    assert torch.allclose(torch.stack(method.alphas), torch.tensor(weights))
    assert all(not a.requires_grad and a.grad is None for a in method.alphas)


def test_deployed_student_is_the_plain_student():
    teacher, student = nets()
    method = methods.build("dfa", student, teacher, input_shape=SHAPE, mode="average", fd_weight=1.0)
    plain = nets()[1]
    assert method.deploy() is student
    assert set(student.state_dict()) == set(plain.state_dict())
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in plain.parameters())
    assert method.side_parameter_count() > 0


def test_errors_name_the_option(tmp_path):
    teacher, student = nets()

    def build(**options):
        return methods.build("dfa", student, teacher, input_shape=SHAPE, **options)

    with pytest.raises(ConfigError, match=r"method\.options\.fd_weight is required"):
        build(mode="last")
    with pytest.raises(ConfigError, match=r"method\.options\.fd_weight is required"):  # with the config, up front
        load_config(None, ["method.name=dfa", "method.options.mode=last"], base={"student": {"name": "resnet8"}})
    with pytest.raises(ConfigError, match=r"method\.options\.weights is not set"):
        build(fd_weight=1.0)
    with pytest.raises(ConfigError, match=r"method\.options\.weights: .*does not exist"):
        build(fd_weight=1.0, weights=tmp_path / "nothing.json")
    with pytest.raises(ConfigError, match=r"groups of \[2, 3\] weights but this teacher has \[2, 2, 2\]"):
        build(fd_weight=1.0, weights=write_aggregation(tmp_path / "a.json", [[0.5, 0.5], [0.2, 0.3, 0.5]]))
    with pytest.raises(ConfigError, match=r"method\.options\.search\.epochs_per_grop: unknown key; did you mean"):
        build(fd_weight=1.0, mode="last", search={"epochs_per_grop": 2})
    with pytest.raises(ConfigError, match="same resolutions"):
        methods.build("dfa", models.build("vgg8", num_classes=10, in_channels=1), teacher, input_shape=SHAPE,
                      mode="last", fd_weight=1.0)


# ------------------------------------------------------------------------------------------ CLI, end to end
def dfa_config(tmp_path, name="dfa", search="epochs_per_group: 1, beta_lr: 0.01", epochs=1):
    teacher, _ = nets()
    save_safetensors(fit_to_digits(teacher), tmp_path / "teacher.safetensors")  # one epoch: the pipeline is tested
    return tiny_config(tmp_path, name, "data.val_size=200", "data.train_subset=400",
                       *teacher_changes(tmp_path / "teacher.safetensors", "resnet14"), "method.name=dfa",
                       f"method.options={{fd_weight: 1.0, search: {{{search}}}}}", f"train.epochs={epochs}",
                       "train.batch_size=50")


def test_search_then_distil_is_one_run_of_two_stages(tmp_path, capsys):
    config = dfa_config(tmp_path)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "dfa"
    search = run / "stages" / "search"
    record = json.loads((search / "aggregation.json").read_text())
    assert (search / "aggregation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (search / "search_dynamics.png").read_bytes()[:4] == b"\x89PNG"  # per-path beta gradients, alpha
    stage_cfg = load_config(search / "config.yaml")
    assert (stage_cfg.method.name, stage_cfg.train.epochs, stage_cfg.train.optim.lr) == ("dfa_search", 3, 0.05)
    assert stage_cfg.train.schedule.name == "constant"
    metrics = [json.loads(line) for line in (search / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and {"log_g2_ts_grad_1", "log_g2_st_grad_0", "log_g2_alpha_1"} <= set(metrics[2])
    assert [g["names"] for g in record["groups"]] == [[f"stages.{i}.0", f"stages.{i}.1"] for i in range(3)]
    assert all(math.isclose(sum(g["weights"]), 1.0, rel_tol=1e-6) for g in record["groups"])
    assert all(g["weights"] != [0.5, 0.5] for g in record["groups"])  # beta moved
    summary = json.loads((run / "summary.json").read_text())
    for ours, group in zip(summary["aggregation"], record["groups"], strict=True):
        assert ours == pytest.approx(group["weights"])
    saved = load_checkpoint(run / CHECKPOINT_FILE)["method"]
    for i, group in enumerate(record["groups"]):
        assert saved[f"alpha_{i}"].tolist() == pytest.approx(group["weights"])
    plain = models.build("resnet8", num_classes=10, in_channels=1)
    assert set(load_file(run / STUDENT_FILE)) == set(plain.state_dict())

    # another run may distil from this search, with no stage of its own
    assert main(["train", str(config), "--set", "name=again", "--set", f"method.options.weights={search}"]) == 0
    assert not (tmp_path / "runs" / "again" / "stages").exists()
    capsys.readouterr()
    assert main(["search", str(config)]) == 2  # the old command names the new one
    assert "distillab train CONFIG" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "method.options.search.epochs_per_group=0"]) == 2
    assert "method.options.search.epochs_per_group" in capsys.readouterr().err


@pytest.mark.slow
def test_a_search_stopped_mid_group_resumes_to_the_same_weights(tmp_path):
    config = dfa_config(tmp_path, "stopped", "epochs_per_group: 3, beta_lr: 0.01")
    reference = dfa_config(tmp_path / "ref", "ref", "epochs_per_group: 3, beta_lr: 0.01")
    subprocess.run([sys.executable, "-m", "distillab", "train", str(reference)], check=True, capture_output=True)
    stage = tmp_path / "runs" / "stopped" / "stages" / "search"
    proc = subprocess.Popen([sys.executable, "-m", "distillab", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # a hang guard, not a speed check
    while not (stage / CHECKPOINT_FILE).is_file():  # written after epoch 1 of group 0's 3
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"distillab train --resume {tmp_path / 'runs' / 'stopped'}" in err  # the whole run, not the stage
    stopped_at = load_checkpoint(stage / CHECKPOINT_FILE)
    assert stopped_at["epoch"] < 9 and not (stage / "summary.json").exists()
    done = subprocess.run([sys.executable, "-m", "distillab", "train", "--resume", str(tmp_path / "runs" / "stopped")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref_stage = tmp_path / "ref" / "runs" / "ref" / "stages" / "search"
    for a, b in ((stage, ref_stage), (stage.parent.parent, ref_stage.parent.parent)):
        ours, theirs = load_checkpoint(a / CHECKPOINT_FILE)["method"], load_checkpoint(b / CHECKPOINT_FILE)["method"]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), a  # bit-identical: the search, then the distillation
    assert json.loads((stage / "aggregation.json").read_text())["groups"] == json.loads(
        (ref_stage / "aggregation.json").read_text())["groups"]


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_configs_validate(path):
    cfg = load_config(path)
    # every config here but the teacher's is a dfa run, which must weight its feature distance: fd_weight has no
    # default (validation refuses a missing one), and 0 would train plain CE under the dfa name
    assert (cfg.method.name == "dfa") == (not path.stem.startswith("teacher_")), cfg.method.name
    if cfg.method.name == "dfa":
        assert validate_options(DFA, cfg.method.options).fd_weight > 0


def test_suite_compares_ce_fitnet_and_the_four_weightings():
    suite = load_suite(ROOT / "suites/fashion_mnist_dfa.yaml")
    assert list(suite.runs) == ["ce", "fitnet", "dfa_searched", "dfa_searched_long", "dfa_last", "dfa_average",
                                "dfa_random"]
    for label in ("searched", "last", "average", "random"):
        cfg = load_config(ROOT / suite.runs[f"dfa_{label}"].config)
        assert cfg.method.options["mode"] == label
    long = load_config(ROOT / suite.runs["dfa_searched_long"].config).method.options
    assert long["mode"] == "searched" and "weights" not in long and long["search"]["epochs_per_group"] == 5
