"""The generated JSON Schema / AsyncAPI files: up to date, well-formed, and describing real messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas import (
    decode_candle,
    decode_dead_letter,
    decode_forecast,
    encode_candle,
    encode_dead_letter,
    encode_forecast,
    export,
    unpackb,
)
from schemas.export import example_candle, example_dead_letter, example_forecast

REPO = Path(__file__).resolve().parents[2]
STEMS = ("candle_event", "forecast_message", "dead_letter_record")


def load(stem: str) -> dict[str, Any]:
    return json.loads((REPO / "schemas" / "json" / f"{stem}.schema.json").read_text(encoding="utf-8"))


# --- a small JSON Schema checker for the keywords the generator emits ----------------------------

_ANNOTATIONS = {
    "$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples",
    "format", "contentMediaType",
}  # fmt: skip


def check(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$") -> None:
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        check(value, root["$defs"][ref.removeprefix("#/$defs/")], root, where)
    for keyword, arg in schema.items():
        if keyword in _ANNOTATIONS or keyword.startswith("x-") or keyword == "$ref":
            continue
        if keyword == "type":
            # msgpack bin arrives as bytes; the schema marks it as a binary string
            string_type = bytes if schema.get("format") == "binary" else str
            expected: tuple[type, ...] = {
                "object": (dict,),
                "array": (list,),
                "string": (string_type,),
                "integer": (int,),
                "number": (int, float),
                "boolean": (bool,),
                "null": (type(None),),
            }[arg]
            assert type(value) in expected, f"{where}: {value!r} is not {arg}"
        elif keyword == "properties":
            for name, sub in arg.items():
                if name in value:
                    check(value[name], sub, root, f"{where}.{name}")
        elif keyword == "required":
            missing = set(arg) - set(value)
            assert not missing, f"{where}: missing {missing}"
        elif keyword == "additionalProperties":
            assert arg is False
            assert set(value) <= set(schema["properties"]), f"{where}: extra keys"
        elif keyword == "items":
            for i, item in enumerate(value):
                check(item, arg, root, f"{where}[{i}]")
        elif keyword == "anyOf":
            errors = []
            for sub in arg:
                try:
                    check(value, sub, root, where)
                    break
                except AssertionError as exc:
                    errors.append(str(exc))
            else:
                raise AssertionError(f"{where}: no anyOf branch matches: {errors}")
        elif keyword == "enum":
            assert value in arg, f"{where}: {value!r} not in {arg}"
        elif keyword == "const":
            assert value == arg and type(value) is type(arg), f"{where}: {value!r} != {arg!r}"
        elif keyword == "pattern":
            assert re.search(arg, value), f"{where}: {value!r} !~ {arg}"
        elif keyword == "minimum":
            assert value >= arg, where
        elif keyword == "maximum":
            assert value <= arg, where
        elif keyword == "exclusiveMinimum":
            assert value > arg, where
        elif keyword == "exclusiveMaximum":
            assert value < arg, where
        elif keyword in ("minLength", "minItems"):
            assert len(value) >= arg, where
        elif keyword in ("maxLength", "maxItems"):
            assert len(value) <= arg, where
        else:
            raise AssertionError(f"{where}: the test checker does not know keyword {keyword!r}")


def wire_examples() -> dict[str, Any]:
    """Each example encoded and decoded again, as a consumer in another language would see it."""
    candle, forecast, dlq = example_candle(), example_forecast(), example_dead_letter()
    assert decode_candle(encode_candle(candle), timeframe="5m") == candle
    assert decode_forecast(encode_forecast(forecast)) == forecast
    assert decode_dead_letter(encode_dead_letter(dlq)) == dlq
    return {
        "candle_event": unpackb(encode_candle(candle)),
        "forecast_message": unpackb(encode_forecast(forecast)),
        "dead_letter_record": unpackb(encode_dead_letter(dlq)),
    }


# --- tests ----------------------------------------------------------------------------------------


def test_files_on_disk_match_the_generator() -> None:
    rendered = export.render()
    assert sorted(p.name for p in rendered) == [
        "asyncapi.yaml",
        "candle_event.schema.json",
        "dead_letter_record.schema.json",
        "forecast_message.schema.json",
    ]
    for path, text in rendered.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run python -m schemas.export"
    assert export.stale_files() == []
    assert export.main(["--check"]) == 0


def test_check_detects_a_stale_or_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "JSON_DIR", tmp_path / "json")
    monkeypatch.setattr(export, "ASYNCAPI_PATH", tmp_path / "asyncapi.yaml")
    monkeypatch.setattr(export, "PACKAGE_DIR", tmp_path)
    assert export.main(["--check"]) == 1  # nothing written yet
    assert export.main([]) == 0
    assert export.main(["--check"]) == 0
    target = tmp_path / "json" / "candle_event.schema.json"
    target.write_text(target.read_text() + " ")
    assert export.main(["--check"]) == 1
    assert export.stale_files() == [target]


def test_export_is_deterministic() -> None:
    assert export.render() == export.render()


def test_cli_check_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "schemas.export", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("stem", STEMS)
def test_schema_headers(stem: str) -> None:
    schema = load(stem)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"{stem}:v1")
    assert schema["title"] and schema["description"]
    assert schema["type"] == "object"
    assert schema["x-content-type"] == "application/msgpack"


@pytest.mark.parametrize("stem", STEMS)
def test_schema_validates_a_real_message(stem: str) -> None:
    schema = load(stem)
    check(wire_examples()[stem], schema, schema)


@pytest.mark.parametrize(
    ("stem", "mutation"),
    [
        ("candle_event", {"close": True}),
        ("candle_event", {"symbol": "eurusd"}),
        ("candle_event", {"open": -1.0}),
        ("forecast_message", {"horizons": []}),
        ("forecast_message", {"steps": 1.5}),
        ("dead_letter_record", {"reason": "nope"}),
        ("dead_letter_record", {"original": "text"}),
    ],
)
def test_schema_rejects_a_bad_message(stem: str, mutation: dict[str, Any]) -> None:
    schema = load(stem)
    with pytest.raises(AssertionError):
        check({**wire_examples()[stem], **mutation}, schema, schema)


def test_required_fields_match_the_contract() -> None:
    assert set(load("candle_event")["required"]) == {
        "symbol", "timeframe", "open_time", "open", "high", "low", "close", "volume", "is_final",
    }  # fmt: skip
    assert "schema_version" not in load("candle_event")["required"]  # optional on input
    forecast = load("forecast_message")
    assert set(forecast["required"]) == set(wire_examples()["forecast_message"])
    horizon = forecast["$defs"]["HorizonForecast"]
    assert set(horizon["required"]) == {
        "horizon_minutes", "horizon_bars", "mean", "std",
        "quantiles", "p_up", "price_mean", "price_quantiles",
    }  # fmt: skip
    for key in ("quantiles", "price_quantiles"):
        assert horizon["properties"][key]["required"] == ["q05", "q10", "q25", "q50", "q75", "q90", "q95"]
    dlq = load("dead_letter_record")
    assert set(dlq["required"]) == set(wire_examples()["dead_letter_record"])
    assert dlq["properties"]["original"]["x-msgpack-type"] == "bin"
    assert "msgpack bin" in dlq["properties"]["original"]["description"]


def test_asyncapi_document() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((REPO / "schemas" / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert doc == export.asyncapi_document()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["defaultContentType"] == "application/msgpack"
    addresses = {name: ch["address"] for name, ch in doc["channels"].items()}
    assert sorted(addresses.values()) == ["candles", "candles.dlq", "forecasts"]
    for channel in doc["channels"].values():
        assert channel["bindings"]["kafka"]["topic"] == channel["address"]
        for ref in channel["messages"].values():
            name = ref["$ref"].removeprefix("#/components/messages/")
            message = doc["components"]["messages"][name]
            assert message["contentType"] == "application/msgpack"
            assert "key" in message["bindings"]["kafka"]
            assert message["headers"]["type"] == "object"
            schema_ref = message["payload"]["schema"]["$ref"]
            assert (REPO / "schemas" / schema_ref).is_file(), schema_ref
    for op in doc["operations"].values():
        channel_name = op["channel"]["$ref"].removeprefix("#/channels/")
        assert channel_name in doc["channels"]
        for ref in op["messages"]:
            assert ref["$ref"].startswith(f"#/channels/{channel_name}/messages/")
    actions = {op["channel"]["$ref"]: op["action"] for op in doc["operations"].values()}
    assert actions == {
        "#/channels/candles": "receive",
        "#/channels/forecasts": "send",
        "#/channels/candlesDeadLetter": "send",
    }
    forecast_headers = doc["components"]["messages"]["ForecastMessage"]["headers"]["properties"]
    assert set(forecast_headers) == {"content-type", "schema_version", "model_version", "idempotency_key"}


def test_with_jsonschema_if_installed() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for stem, message in wire_examples().items():
        schema = load(stem)
        jsonschema.Draft202012Validator.check_schema(schema)
        as_json = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in message.items()}
        jsonschema.Draft202012Validator(schema).validate(as_json)


def test_schemas_package_imports_neither_worker_nor_torch() -> None:
    code = (
        "import sys, schemas, schemas.export; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'worker', 'torch'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
