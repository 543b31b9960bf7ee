"""MLKD (the reference code's loss, by an independent numpy derivation) and UniKD's two-view Variant B."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fit_to_digits, teacher_changes, tiny_config
from distillab import methods, models
from distillab.cli import main
from distillab.config_files import load_config
from distillab.engine.checkpoint import save_safetensors
from distillab.losses import MLKD_TEMPERATURES as TEMPERATURES
from distillab.losses import at_most_median, mlkd_terms
from distillab.methods.capabilities import wants_strong_view


def softmax(z, t):
    e = np.exp(z / t - (z / t).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_kd(s, t, temp):  # T^2 * batch mean of KL(p_t || p_s)
    ps, pt = softmax(s, temp), softmax(t, temp)
    return temp**2 * (pt * (np.log(pt) - np.log(ps))).sum(1).mean()


def np_cc(s, t, temp):
    ps, pt = softmax(s, temp), softmax(t, temp)
    return ((pt.T @ pt - ps.T @ ps) ** 2).sum() / s.shape[1]


def np_bc(s, t, temp):
    ps, pt = softmax(s, temp), softmax(t, temp)
    return ((pt @ pt.T - ps @ ps.T) ** 2).sum() / s.shape[0]


def logits(seed, n=9, c=7):
    return np.random.default_rng(seed).normal(0, 2, (n, c))


@pytest.mark.parametrize("quirk", [True, False])
def test_mlkd_terms_match_an_independent_numpy_derivation(quirk):
    ws, wt, ss, st = (logits(i) for i in range(4))
    pt = softmax(wt, 1.0)
    sample_mask = pt.max(1) <= np.percentile(pt.max(1), 50)  # the reference's masks, by numpy's percentile
    class_mask = pt.sum(0) <= np.percentile(pt.sum(0), 50)
    strong = [(ws, wt) if quirk and temp in (2.0, 6.0) else (ss, st) for temp in TEMPERATURES]
    expected = {
        "kd": sample_mask.mean() * sum(np_kd(ws, wt, temp) for temp in TEMPERATURES)
              + sum(np_kd(a, b, temp) for (a, b), temp in zip(strong, TEMPERATURES, strict=True)),
        "cc": class_mask.mean() * sum(np_cc(ws, wt, temp) for temp in TEMPERATURES),
        "bc": sample_mask.mean() * sum(np_bc(ws, wt, temp) for temp in TEMPERATURES),
    }
    ours = mlkd_terms(*(torch.tensor(a, dtype=torch.float32) for a in (ws, wt, ss, st)), quirk=quirk)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key].item() == pytest.approx(value, rel=1e-4), key
    assert sample_mask.mean() == pytest.approx(5 / 9)  # 9 samples: the median one and the 4 below it


def test_the_median_mask_counts_ties_and_needs_no_host_sync():
    assert at_most_median(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == 0.5  # median 2.5
    assert at_most_median(torch.tensor([2.0, 2.0, 2.0, 5.0])).item() == 0.75
    assert at_most_median(torch.tensor([3.0])).item() == 1.0


def test_identical_logits_give_no_distillation_loss():
    z = torch.tensor(logits(5), dtype=torch.float32)
    assert all(v.abs().item() < 1e-5 for v in mlkd_terms(z, z, z, z).values())


def nets(seed=0, classes=10):
    torch.manual_seed(seed)
    teacher = models.build("resnet14", num_classes=classes, in_channels=1).eval()
    torch.manual_seed(seed + 1)
    return models.build("resnet8", num_classes=classes, in_channels=1), teacher


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(n, 1, 16, 16, generator=g))


def test_mlkd_method_takes_two_views_and_scores_the_weak_one():
    student, teacher = nets()
    method = methods.build("mlkd", student, teacher, input_shape=(1, 16, 16))
    assert wants_strong_view(method)
    x, y, strong = batch()
    out, terms = method(x, y, strong)
    assert set(terms) == {"ce", "kd", "cc", "bc"}
    with torch.no_grad():
        s_weak, s_strong = student(x), student(strong)
        t_weak, t_strong = teacher(x), teacher(strong)
    assert torch.allclose(out, s_weak, atol=1e-5)
    ce = F.cross_entropy(s_weak, y) + F.cross_entropy(s_strong, y)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(mlkd_terms(s_weak, t_weak, s_strong, t_strong)["kd"].item(), rel=1e-4)


def test_unikd_variant_b_is_mlkd_plus_the_unikd_terms_on_both_views():
    student, teacher = nets()
    method = methods.build("unikd", student, teacher, input_shape=(1, 16, 16), logit_loss="mlkd",
                           dist_temperature=4.0)
    assert wants_strong_view(method)
    x, y, strong = batch()
    torch.manual_seed(3)
    _, terms = method(x, y, strong)
    assert set(terms) == {"ce", "kd", "cc", "bc", "feat", "supp"}
    with torch.no_grad():
        s_weak, s_strong = student(x), student(strong)
        t_weak, t_strong = teacher(x), teacher(strong)
    expected = mlkd_terms(s_weak, t_weak, s_strong, t_strong)
    for key in ("kd", "cc", "bc"):  # no warm-up in Variant B
        assert terms[key].item() == pytest.approx(expected[key].item(), rel=1e-4), key
    # feat and supp are the single-view terms of each view, summed: the strong view adds its own
    single = methods.build("unikd", *nets(), input_shape=(1, 16, 16), logit_loss="dkd", dist_temperature=4.0)
    single.load_state_dict(method.state_dict())
    torch.manual_seed(3)
    _, weak_terms = single(x, y)
    assert terms["feat"].item() > weak_terms["feat"].item() > 0
    sum(terms.values()).backward()
    assert method.fdp_teacher.mean.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method", ["mlkd", "unikd"])
def test_two_view_methods_train_from_the_cli(tmp_path, method):
    options = "{logit_loss: mlkd}" if method == "unikd" else "{}"
    torch.manual_seed(0)
    save_safetensors(fit_to_digits(models.build("resnet14", num_classes=10, in_channels=1)),
                     tmp_path / "teacher.safetensors")
    config = tiny_config(tmp_path, "two_views", "data.augment.flip=true", "train.batch_size=50",
                         *teacher_changes(tmp_path / "teacher.safetensors", "resnet14"), f"method.name={method}",
                         f"method.options={options}")
    assert main(["train", str(config)]) == 0
    assert (tmp_path / "runs" / "two_views" / "summary.json").is_file()


def test_variant_b_configs_follow_the_authors_recipe():
    root = Path(__file__).resolve().parents[1]
    configs = {p.stem: load_config(p) for p in (root / "configs/cifar100/unikd_mlkd").glob("[!_]*.yaml")}
    assert set(configs) == {p.stem for p in (root / "configs/cifar100/unikd").glob("*.yaml")}  # every pair
    for name, cfg in configs.items():
        small = cfg.student.name.startswith(("Shuffle", "mobile"))
        assert cfg.method.options["logit_loss"] == "mlkd" and cfg.method.options["dist_temperature"] == 4.0
        assert cfg.train.optim.lr == (0.01 if small else 0.025), name
        assert cfg.train.epochs == (960 if name.startswith("resnet32x4_Shuffle") else 480), name
        assert cfg.train.schedule.milestones == [150, 180, 210] and cfg.train.batch_size == 64
