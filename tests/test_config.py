import pytest
import yaml

from moe_arch.config import Config, ConfigError, load_config, parse_overrides


def err(section_values: dict) -> str:
    with pytest.raises(ConfigError) as e:
        Config.from_dict(section_values, "cfg.yaml")
    msg = str(e.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


@pytest.mark.parametrize(
    "model, field, allowed",
    [
        ({"d_model": 100, "n_heads": 3}, "model.n_heads=3", "must divide model.d_model=100"),
        ({"moe_layers": [1], "n_experts": 2, "top_k": 3, "d_ff_expert": 8}, "model.top_k=3", "[1, model.n_experts=2]"),
        ({"n_layers": 4, "moe_layers": [4], "n_experts": 2, "d_ff_expert": 8}, "model.moe_layers=[4]", "[0, 3]"),
        ({"n_layers": 4, "mamba_layers": [-1]}, "model.mamba_layers=[-1]", "out of range"),
        ({"mod_layers": [1], "mod_capacity": 0.0}, "model.mod_capacity=0.0", "(0, 1]"),
        ({"mod_layers": [1], "mod_capacity": 1.5}, "model.mod_capacity=1.5", "(0, 1]"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads=3", "must divide model.n_heads=4"),
        ({"mamba_layers": [1, 1]}, "model.mamba_layers=[1, 1]", "twice"),
    ],
)
def test_bad_model_values_name_field_value_and_allowed(model, field, allowed):
    msg = err({"model": model})
    assert msg.startswith("cfg.yaml: ")
    assert field in msg and allowed in msg


def test_moe_and_mamba_on_the_same_layer_is_supported():
    # Jamba-style: a Mamba sequence layer with an MoE feed-forward layer in one block.
    cfg = Config.from_dict(
        {"model": {"n_layers": 2, "moe_layers": [1], "mamba_layers": [1], "n_experts": 2, "d_ff_expert": 16}}
    )
    assert cfg.model.moe_layers == cfg.model.mamba_layers == [1]


def test_bad_training_values():
    assert "train.precision='fp8'" in err({"train": {"precision": "fp8"}})
    assert "train.seq_len=4096: must be <= model.max_seq_len=256" in err(
        {"model": {"max_seq_len": 256}, "train": {"seq_len": 4096}}
    )
    assert "expected an integer" in err({"train": {"steps": "many"}})


def test_unknown_field_suggests_the_closest():
    msg = err({"model": {"d_modle": 64}})
    assert "model.d_modle: unknown field" in msg and "did you mean 'd_model'" in msg
    assert "unknown section 'modle'" in err({"modle": {}})


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", "model": {"d_model": 64}, "train": {"steps": 7}}))
    cfg = load_config(
        str(path),
        ["--model.n_heads", "2", "--train.seq_len=64", "--model.moe_layers", "0,2", "--optim.adamw_lr", "1e-3"],
    )
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.steps, cfg.train.seq_len) == (64, 2, 7, 64)
    assert cfg.model.moe_layers == [0, 2] and cfg.model.n_experts == 4  # the rest comes from the preset
    assert cfg.optim.adamw_lr == pytest.approx(1e-3)


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: 100\n  n_heads: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.n_heads=3"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config("tinyy")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected --SECTION.FIELD VALUE"):
        parse_overrides(["d_model", "3"])
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--model.d_model"])


def test_presets_validate():
    for name in ("tiny", "seed-3b"):
        cfg = load_config(name)
        assert cfg.model.n_layers > 0
    seed = load_config("seed-3b").model
    assert (seed.d_model, seed.n_layers, seed.n_experts, seed.top_k, seed.n_heads, seed.n_kv_heads, seed.head_dim) == (
        1792,
        24,
        14,
        2,
        16,
        4,
        112,
    )
    assert seed.mamba_layers == [5, 9, 13, 17, 21] and seed.mod_capacity == 0.75 and seed.n_predict == 4
