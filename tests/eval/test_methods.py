"""Methods are applied through transformers' own rope scaling / apply_dca, recorded, and reversible."""

import pytest
import torch

from chunkllama import get_dca_config
from chunkllama.eval.methods import apply_method, method_applied, parse_method, parse_methods


def test_parse_methods():
    specs = parse_methods(["none,yarn", "dca:chunk_size=32,local_window=4", "ntk:factor=2"])
    assert [s.name for s in specs] == ["none", "yarn", "dca", "ntk"]
    assert specs[2].option("chunk_size") == 32 and specs[2].label == "dca(chunk_size=32,local_window=4)"
    assert specs[3].option("factor") == 2.0
    one_string = parse_methods("none,yarn:factor=2,dca:chunk_size=32,local_window=4,ntk")
    assert [s.label for s in one_string] == ["none", "yarn(factor=2.0)", "dca(chunk_size=32,local_window=4)", "ntk"]
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("alibi")
    with pytest.raises(ValueError, match="bad option"):
        parse_method("yarn:chunk_size=3")


@pytest.mark.parametrize("name, rope_type", [("pi", "linear"), ("ntk", "dynamic"), ("yarn", "yarn")])
def test_rope_methods_factor_and_restore(tiny_model, name, rope_type):
    ids = torch.randint(3, 300, (1, 160))
    before = tiny_model(ids).logits
    rope_before = dict(tiny_model.config.rope_parameters)
    with method_applied(tiny_model, name, 256) as record:
        assert record["rope_parameters"]["rope_type"] == rope_type
        assert record["rope_parameters"]["factor"] == 4.0  # 256 / 64
        assert record["rope_parameters"]["original_max_position_embeddings"] == 64
        assert record["rotary"]["rope_type"] == rope_type
        assert tiny_model.model.rotary_emb.rope_type == rope_type
        assert not torch.allclose(tiny_model(ids).logits, before)
    assert tiny_model.config.rope_parameters == rope_before
    assert torch.equal(tiny_model(ids).logits, before)


def test_rope_method_within_window_is_plain(tiny_model):
    applied = apply_method(tiny_model, "yarn", 64)
    assert applied.record["rope_parameters"]["rope_type"] == "default"
    assert "note" in applied.record
    applied.restore()


def test_dca_method_recorded_and_removed(tiny_model):
    ids = torch.randint(3, 300, (1, 120))
    before = tiny_model(ids).logits
    with method_applied(tiny_model, "dca:chunk_size=32,local_window=4", 512) as record:
        assert record["dca"] == {"pretraining_length": 64, "chunk_size": 32, "local_window": 4, "chunk_len": 28}
        out = tiny_model(ids).logits
        torch.testing.assert_close(out[:, :28], before[:, :28])  # one chunk: plain attention
        assert not torch.allclose(out, before)
    assert get_dca_config(tiny_model) is None
    assert torch.equal(tiny_model(ids).logits, before)


def _plain_dca(tiny_model):
    """Logits of random ids under plain ``dca:chunk_size=32,local_window=4``, with the ids and the record."""
    ids = torch.randint(3, 300, (1, 120))
    with method_applied(tiny_model, "dca:chunk_size=32,local_window=4", 512) as record:
        return ids, tiny_model(ids).logits, record


def test_dca_logit_scale_option_is_applied_and_recorded(tiny_model):
    ids, plain, record = _plain_dca(tiny_model)
    assert record["logit_scale"] == 1.0
    spec = parse_method("dca:chunk_size=32,local_window=4,logit_scale=1.25")
    assert spec.option("logit_scale") == 1.25 and spec.label.endswith("logit_scale=1.25)")
    with method_applied(tiny_model, spec, 512) as record:
        assert record["logit_scale"] == 1.25
        assert not torch.allclose(tiny_model(ids).logits, plain)
    with pytest.raises(ValueError, match="logit_scale='warm' is not float"):
        parse_method("dca:logit_scale=warm")


def test_dca_logn_options_are_applied_and_recorded(tiny_model):
    ids, plain, record = _plain_dca(tiny_model)
    assert record["logn"] is None
    spec = parse_method("dca:chunk_size=32,local_window=4,logn_scale=0.3,logn_base=40")
    with method_applied(tiny_model, spec, 512) as record:
        assert record["logn"] == (0.3, 40)
        out = tiny_model(ids).logits
        torch.testing.assert_close(out[:, :39], plain[:, :39])  # positions below the base: factor 1
        assert not torch.allclose(out[:, 60:], plain[:, 60:])
    with pytest.raises(ValueError, match="logn_base='8k' is not int"):
        parse_method("dca:logn_base=8k")


def test_dca_layer_window_options_are_applied_and_recorded(tiny_model):
    ids, plain, record = _plain_dca(tiny_model)
    assert record["layer_windows"] == {}
    spec = parse_method("dca:chunk_size=32,local_window=4,layer_window=16,layer_window_layers=1")
    with method_applied(tiny_model, spec, 512) as record:
        assert record["layer_windows"] == {1: 16}
        assert not torch.allclose(tiny_model(ids).logits, plain)
    with pytest.raises(ValueError, match="give layer_window and layer_window_layers together"):
        with method_applied(tiny_model, "dca:layer_window=16", 512):
            pass
    for bad in ("3-1", "a-b", "1-"):
        with pytest.raises(ValueError, match="is not layer_range"):
            parse_method(f"dca:layer_window=16,layer_window_layers={bad}")
    from chunkllama.eval.method_specs import layers_of
    assert list(layers_of("2-4")) == [2, 3, 4] and list(layers_of("7")) == [7]


def test_dca_method_uses_settings_the_config_records(tiny_model):
    """A fine-tuned model's recorded DCA settings are what ``dca`` evaluates with, unless a length is given."""
    from chunkllama import DCAConfig

    recorded = DCAConfig(48, chunk_size=40, local_window=10)
    recorded.write_to_model_config(tiny_model.config)
    try:
        with method_applied(tiny_model, "dca", 256) as record:
            assert record["dca"]["chunk_size"] == 40 and record["pretraining_length"] == 48
        with method_applied(tiny_model, "dca", 256, pretraining_length=64) as record:
            assert record["dca"]["chunk_size"] == 48 and record["dca"]["local_window"] == 8
        with method_applied(tiny_model, "dca:chunk_size=30", 256) as record:
            assert record["dca"]["chunk_size"] == 30 and record["dca"]["pretraining_length"] == 64
    finally:
        del tiny_model.config.dual_chunk_attention_config


def test_eval_help_names_every_method_option():
    """``chunkllama eval <task> --help`` lists the option names the method specs accept."""
    import inspect
    import re

    from chunkllama.eval import commands
    from chunkllama.eval.method_specs import _DCA_OPTIONS, _ROPE_OPTIONS

    for command in (commands.eval_ppl, commands.eval_passkey, commands.eval_needle, commands.eval_longqa):
        doc = inspect.getdoc(command)
        start = doc.index("methods:")
        listed = set(re.findall(r"[a-z_]+", doc[doc.index("(", start):doc.index(")", start)]))
        assert set(_DCA_OPTIONS) | set(_ROPE_OPTIONS) <= listed, command.__name__
