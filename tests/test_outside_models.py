"""Outside models (Hugging Face, timm, torchvision, import paths) as teachers and students, through feature roles.

transformers is an optional test extra: its tests are skipped when it cannot be imported. timm and torchvision
cannot load beside this CPU torch, so their adapters are pinned on stand-in modules with their documented API.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

from conftest import fit_to_digits, teacher_changes, tiny_config
from distillab import methods, models
from distillab.cli import main
from distillab.engine.checkpoint import load_weights, save_safetensors
from distillab.errors import ConfigError, UnknownNameError
from distillab.features import FeatureTap
from distillab.models.outside import HFClassifier
from distillab.roles import roles

SHAPE = (1, 28, 28)
HF_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4)
HF_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], layer_type="basic")


def hf(kind: str, shape=SHAPE, **kwargs) -> nn.Module:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    spec = {"vit": HF_VIT, "resnet": HF_RESNET}[kind]
    return models.build(f"hf:{kind}", num_classes=10, in_channels=shape[0], input_size=shape, **{**spec, **kwargs})


def test_hf_vit_returns_logits_and_its_token_states_as_maps():
    model = hf("vit").eval()
    x = torch.randn(3, *SHAPE)
    info = roles(model)
    with FeatureTap(model, [*info.stage_names, info.pooled]) as tap, torch.no_grad():
        logits = model(x)
        out = model.model(pixel_values=x, output_hidden_states=True)
    assert isinstance(model, HFClassifier) and torch.equal(logits, out.logits)
    assert info.stage_names == ["hidden.1", "hidden.2", "hidden.3", "hidden.4"]  # 4 layers, one per stage
    assert [s.reduction for s in info.stages] == [4] * 4 and info.channels == 32 and info.last_conv is None
    tokens = out.hidden_states[2]  # B x (1 + 49) x C, the class token first
    feature = tap["hidden.2"]
    assert feature.shape == (3, 32, 7, 7)
    assert torch.equal(feature[:, :, 2, 5], tokens[:, 1 + 2 * 7 + 5])  # row-major patches, class token dropped
    with torch.no_grad():  # ViT classifies the normalised class token
        assert torch.equal(tap[info.pooled], model.model.vit.layernorm(out.hidden_states[-1])[:, 0])


def test_a_deep_hf_vit_groups_its_layers_into_four_stages():
    info = roles(hf("vit", num_hidden_layers=6))
    assert [s.blocks for s in info.stages] == [("hidden.1",), ("hidden.2", "hidden.3"), ("hidden.4",),
                                               ("hidden.5", "hidden.6")]


def test_hf_resnet_roles_follow_its_stages():
    model = hf("resnet", shape=(1, 32, 32)).eval()
    info = roles(model)
    assert [(s.channels, s.reduction) for s in info.stages] == [(16, 4), (32, 8), (64, 16), (64, 32)]
    assert info.last_conv == "model.resnet.encoder.stages.3.layers.0.layer.1.convolution"
    x = torch.randn(2, 1, 32, 32)
    with FeatureTap(model, [info.pooled, info.prepool]) as tap, torch.no_grad():
        model(x)
    assert tap[info.pooled].shape == (2, 64)
    assert torch.allclose(tap[info.pooled], tap[info.prepool].mean(dim=(2, 3)), atol=1e-6)


ROLE_METHODS = ["kd", "fitnet", "at", "diffkd", "rdr", "unikd"]


@pytest.mark.parametrize("method", ROLE_METHODS)
@pytest.mark.parametrize("pair", ["hf_vit_teaches_resnet8", "resnet8_teaches_hf_vit", "resnet20_teaches_hf_resnet"])
def test_role_methods_train_with_hf_models_as_teacher_and_student(method, pair):
    zoo = {"resnet8": models.build("resnet8", 10, 1), "resnet20": models.build("resnet20", 10, 1)}
    teacher, student = {"hf_vit_teaches_resnet8": (hf("vit"), zoo["resnet8"]),
                        "resnet8_teaches_hf_vit": (zoo["resnet8"], hf("vit")),
                        "resnet20_teaches_hf_resnet": (zoo["resnet20"], hf("resnet"))}[pair]
    options = {"fitnet": {"student_layer": "hidden.1", "teacher_layer": "stages.2"}}.get(method, {}) \
        if pair == "resnet20_teaches_hf_resnet" else {}  # 28 px: the HF ResNet's stage 2 is 4x4, resnet20's 14x14
    if method == "rdr" and pair == "resnet8_teaches_hf_vit":
        with pytest.raises(ConfigError, match=r"method\.options\.where"):  # a transformer has no conv to branch
            methods.build(method, student, teacher, input_shape=SHAPE)
        return
    torch.manual_seed(1)
    built = methods.build(method, student, teacher, input_shape=SHAPE, **options)
    x, y = torch.randn(6, *SHAPE), torch.randint(0, 10, (6,))
    logits, terms = built(x, y)
    assert logits.shape == (6, 10) and len(terms) >= 2
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    grads = [p.grad for p in built.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    feature_terms = {k: v for k, v in terms.items() if k not in ("ce", "kd", "dkd")}
    assert method == "kd" or feature_terms  # the feature term of each feature method is there


def test_rdr_merges_its_branches_into_an_hf_resnet_student():
    method = methods.build("rdr", hf("resnet"), models.build("resnet20", 10, 1), input_shape=SHAPE)
    with torch.no_grad():
        for p in method.branches.parameters():
            p.add_(0.1 * torch.randn_like(p))  # branches that differ from their initial copies
    method.eval()
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        trained = method.student(x)
        method.close()
        deployed = method.deploy().eval()(x)
    assert torch.allclose(trained, deployed, atol=1e-4)
    assert not any("branches" in k for k in method.deploy().state_dict())


@pytest.fixture(scope="module")
def saved_hf_vit(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "vit_teacher"
    model = fit_to_digits(hf("vit", shape=(1, 8, 8), patch_size=2, image_size=8), epochs=6, lr=3e-3)  # ~40 %:
    model.model.save_pretrained(directory)  # above chance, as a run requires of a teacher
    return directory


@pytest.mark.parametrize("method", ["fitnet", "diffkd", "rdr", "unikd"])
def test_an_hf_vit_teaches_a_zoo_cnn_from_a_yaml_config(tmp_path, saved_hf_vit, method):
    """`hf:<directory>` with its saved weights as the teacher (no teacher.checkpoint), a YAML run, export."""
    config = tiny_config(tmp_path, "from_hf", f"teacher.name='hf:{saved_hf_vit}'", f"method.name={method}")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "runs" / "from_hf"
    summary = (run / "summary.json").read_text()
    assert "vit_teacher" in summary and "teacher_weights" in summary
    assert main(["export", str(run), "--output", str(tmp_path / "student.safetensors")]) == 0
    assert (tmp_path / "student.safetensors").stat().st_size > 0


def test_an_hf_student_trains_and_evaluates_from_the_cli(tmp_path, untrained_digits_teacher):
    pytest.importorskip("transformers")
    config = tiny_config(tmp_path, "hf_student", *teacher_changes(untrained_digits_teacher, "resnet8"),
                         "student.name='hf:resnet'", "student.kwargs={embedding_size: 8, hidden_sizes: [8, 16], "
                         "depths: [1, 1], layer_type: basic}", "method.name=kd")
    assert main(["train", str(config)]) == 0
    assert main(["eval", str(tmp_path / "runs" / "hf_student")]) == 0


def test_an_import_path_model_with_dict_outputs_is_adapted(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes, width=8):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())\n"
        "        self.fc = nn.Linear(width, num_classes)\n"
        "    def forward(self, x):\n"
        "        return {'logits': self.fc(self.body(x).mean((2, 3)))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.build("module:my_nets:Net", num_classes=5, in_channels=3, width=4)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model.model(x)["logits"]) and model.model.fc.in_features == 4
    method = methods.build("kd", model, copy.deepcopy(model), input_shape=(3, 32, 32))
    assert set(method(x, torch.tensor([0, 1]))[1]) == {"ce", "kd"}
    with pytest.raises(ConfigError, match=r"declares no feature roles.*method\.options\.student_layer"):
        methods.build("fitnet", model, copy.deepcopy(model), input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="cannot import 'Nope' from 'my_nets'"):
        models.build("module:my_nets:Nope", num_classes=5)


class _TimmLike(nn.Module):
    """A stand-in with timm's model API: `feature_info` entries and `get_classifier()`."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, stride=2, padding=1)
        self.stages = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(16, 24, 3, stride=2, padding=1))
        self.head = nn.Linear(24, num_classes)
        self.feature_info = [{"module": "stages.0", "num_chs": 16, "reduction": 4},
                             {"module": "stages.1", "num_chs": 24, "reduction": 8}]

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_timm_models_take_their_roles_from_timm_feature_info(monkeypatch):
    made = {}

    def create_model(name, pretrained, num_classes, in_chans, **kwargs):
        made.update(name=name, pretrained=pretrained, **kwargs)
        return _TimmLike(num_classes, in_chans)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    model = models.build("timm:tiny_net", num_classes=7, in_channels=1, input_size=(1, 32, 32), drop_rate=0.1)
    assert made == {"name": "tiny_net", "pretrained": False, "drop_rate": 0.1}
    info = roles(model)
    assert [(s.name, s.channels, s.reduction) for s in info.stages] == [("model.stages.0", 16, 4),
                                                                         ("model.stages.1", 24, 8)]
    assert info.pooled == "model.head:input" and info.channels == 24
    assert isinstance(model.model.feature_info, list)  # timm's own stays as it was
    method = methods.build("fitnet", model, copy.deepcopy(model), input_shape=(1, 32, 32))
    assert "hint" in method(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))[1]


def test_missing_outside_packages_and_bad_names_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, as it does beside this torch
    with pytest.raises(ConfigError, match="needs the torchvision package"):
        models.build("torchvision:resnet18", num_classes=10)
    with pytest.raises(ConfigError, match="nothing after 'hf:'"):
        models.build("hf:", num_classes=10)
    with pytest.raises(ConfigError, match=r"module:<package\.module>:<factory>"):
        models.build("module:only_a_module", num_classes=10)
    with pytest.raises(UnknownNameError, match=r"hf:\.\.\., timm:\.\.\."):
        models.build("resnet8_typo", num_classes=10)


def test_an_unknown_hf_model_type_is_refused_by_name():
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="'not_a_model' is neither a directory nor a transformers model type"):
        models.build("hf:not_a_model", num_classes=10)


def test_a_saved_outside_student_loads_back(tmp_path):
    model = hf("vit").eval()
    path = tmp_path / "vit.safetensors"
    save_safetensors(model, path)
    fresh = hf("vit", hidden_dropout_prob=0.0)

    load_weights(fresh, path, "student")
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_dfa_pairs_hf_models_by_their_roles_and_its_search_names_what_it_lacks():
    teacher, student = hf("resnet"), hf("resnet", hidden_sizes=[8, 16, 32, 32])
    method = methods.build("dfa", copy.deepcopy(student), teacher, input_shape=SHAPE, mode="last", fd_weight=1.0)
    assert method.groups.names == [["hidden.1"], ["hidden.2"], ["hidden.3"], ["hidden.4"]]
    _, terms = method(torch.randn(4, *SHAPE), torch.randint(0, 10, (4,)))
    assert set(terms) == {"ce", "fd"} and terms["fd"] > 0
    with pytest.raises(ConfigError, match=r"forward_from.*method\.options\.mode"):
        methods.build("dfa_search", student, teacher, input_shape=SHAPE)
