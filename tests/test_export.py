"""Export (issue 23, part 4): a model's inference path at a depth as ONNX, from GET
/v1/models/{name}/versions/{v}/export (the real app; each export in its own `al export` child process) and from
`al export`, run by onnxruntime on real rows and compared with what the service's predict answers for them: digits
at the full depth and a shallower one over HTTP, an LSTM over HTTP and a Transformer from the command line, their
texts tokenized as a caller does, with the tokenizer the file carries. Then the errors of a bad format, a bad
depth, another tenant."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
from service_support import digits_rows, drop_queue, register_model, registered_model_client
from test_text import synthetic_texts, write_csv
from tokenizers import Tokenizer

from al.checkpoint import load_model
from al.cli import main
from al.config import make_config
from al.run import train

MODELS = {
    "digits": {"arch": "mlp", "widths": [32, 32], "target_width": 16},
    "lstm": {"arch": "lstm", "embedding_dim": 16, "widths": [8], "target_width": 12, "max_tokens": 24,
             "vocab_size": 200},
    "transformer": {"arch": "transformer", "embedding_dim": 16, "heads": 2, "widths": [16], "target_width": 12,
                    "max_tokens": 24, "vocab_size": 200},
}
CLASSES = ["food", "sports", "tech"]
# Real rows of their kinds; texts with an empty one, one past max_tokens and words the vocabulary lacks.
ROWS = digits_rows(300)[-120:]
TEXTS = ["the team and the ball, a goal", "linux kernel code", "bread and soup", "", "cook soup " * 50,
         "zyzzyva quux", *(text for text, _ in synthetic_texts(40, seed=7))]
OWNER, OTHER_TENANT = {"Authorization": "Bearer owner-key"}, {"Authorization": "Bearer other-key"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    texts = write_csv(root / "texts.csv", synthetic_texts(240))
    training = {"epochs": 1, "batch_size": 32, "device": "cpu"}
    for name, model in MODELS.items():
        train("digits" if name == "digits" else str(texts), root / name, make_config(model=model, training=training))
    return {name: root / name for name in MODELS}


@pytest.fixture
def client(tmp_path, monkeypatch, model_dirs):
    """The app with "digits" and "lstm" registered in the owner's tenant (default), as version 1; the other key's
    tenant has none."""
    client = registered_model_client(tmp_path, monkeypatch, model_dirs["digits"],
                                     AL_API_KEYS="owner-key:predict, other-key:predict:other")
    register_model(client.app.state.core.settings, model_dirs["lstm"], name="lstm")
    yield client
    drop_queue({"AL_QUEUE": client.app.state.core.settings.queue})


def exported(client, name: str, depth: int | None) -> onnxruntime.InferenceSession:
    """The version's file from the export route, checked as an attachment, as an onnxruntime session."""
    params = {"format": "onnx", **({"depth": depth} if depth else {})}
    response = client.get(f"/v1/models/{name}/versions/1/export", params=params, headers=OWNER)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    k = depth or len(MODELS[name]["widths"]) + (name != "digits")  # a text model's f_1 is its embedding
    assert response.headers["content-disposition"] == f'attachment; filename="{name}-1-depth{k}.onnx"'
    return onnxruntime.InferenceSession(response.content)


def metadata(session: onnxruntime.InferenceSession) -> dict:
    return session.get_modelmeta().custom_metadata_map


def predicted(client, name: str, inputs: list, depth: int | None) -> np.ndarray:
    body = {"inputs": inputs, **({"depth": depth} if depth else {})}
    response = client.post(f"/v1/models/{name}/versions/1/predict", json=body, headers=OWNER)
    assert response.status_code == 200, response.text
    return np.array(response.json()["probabilities"])


@pytest.mark.parametrize("depth", [None, 1])
def test_an_exported_digits_model_answers_what_predict_answers(client, depth):
    session = exported(client, "digits", depth)
    [given], [answered] = session.get_inputs(), session.get_outputs()
    assert (given.name, given.type, given.shape) == ("input", "tensor(float)", ["batch", 1, 8, 8])
    assert (answered.name, answered.shape) == ("probabilities", ["batch", 10])
    k = depth or 2
    assert {key: metadata(session)[key] for key in ("classes", "depth", "components", "input_kind", "input_shape")} \
        == {"classes": json.dumps(list(range(10))), "depth": str(k), "components": "2", "input_kind": "tensor",
            "input_shape": "[1, 8, 8]"}
    rows = np.array(ROWS, dtype=np.float32).reshape(-1, 1, 8, 8)  # raw: the graph normalises as the service does
    probabilities = session.run(None, {"input": rows})[0]
    np.testing.assert_allclose(probabilities, predicted(client, "digits", ROWS, depth), rtol=0, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"input": rows[:1]})[0], probabilities[:1], rtol=0, atol=1e-6)
    other_depth = predicted(client, "digits", ROWS, 3 - k)
    assert np.abs(probabilities - other_depth).max() > 1e-3  # the comparison can tell the depths apart


def text_probabilities(session: onnxruntime.InferenceSession) -> np.ndarray:
    """The file's answer for TEXTS, tokenized as a caller does: with the tokenizer in its metadata."""
    meta = metadata(session)
    assert (json.loads(meta["classes"]), meta["input_kind"], meta["input_shape"]) == (CLASSES, "text", "[24]")
    assert session.get_inputs()[0].shape == ["batch", 24] and session.get_inputs()[0].type == "tensor(int64)"
    tokenizer = Tokenizer.from_str(meta["tokenizer"])  # padded and cut to max_tokens, as the model's own
    ids = np.array([encoding.ids for encoding in tokenizer.encode_batch(TEXTS)], dtype=np.int64)
    return session.run(None, {"input": ids})[0]


def test_an_exported_lstm_reads_token_ids_from_the_tokenizer_it_carries(client):
    session = exported(client, "lstm", None)  # the full depth: through the LSTM layer
    np.testing.assert_allclose(text_probabilities(session), predicted(client, "lstm", TEXTS, None), rtol=0,
                               atol=1e-5)


def test_al_export_writes_a_transformer_and_refuses_what_does_not_fit(model_dirs, tmp_path, capsys):
    out = tmp_path / "transformer.onnx"
    assert main(["export", "--model", str(model_dirs["transformer"]), "--format", "onnx", "--out", str(out),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "format": "onnx", "depth": 2,
                                                   "bytes": out.stat().st_size}
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["depth"] == "2"
    model = load_model(model_dirs["transformer"])  # the service predicts with this, on a version's directory
    expected = model.predict(model.request(TEXTS)).probabilities
    np.testing.assert_allclose(text_probabilities(onnxruntime.InferenceSession(str(out))), expected, rtol=0,
                               atol=1e-5)

    refused = tmp_path / "refused.onnx"
    deep = ["export", "--model", str(model_dirs["digits"]), "--format", "onnx", "--depth", "3", "--out", str(refused)]
    assert main(deep) == 2
    assert "al export: error: depth must be between 1 and 2 for this model, got 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        main(["export", "--model", str(model_dirs["digits"]), "--format", "tflite", "--out", str(refused)])
    assert exit_status.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "none"), "--format", "onnx", "--out", str(refused)]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert not refused.exists()


def test_a_bad_format_or_depth_is_a_422_naming_it_and_other_tenants_see_no_model(client):
    url = "/v1/models/digits/versions/1/export"
    for params, problem in (({"format": "tflite"}, "format must be one of onnx, got 'tflite'"),
                            ({"format": "onnx", "depth": 3}, "depth must be between 1 and 2 for this model, got 3"),
                            ({"format": "onnx", "depth": 0}, "depth must be between 1 and 2 for this model, got 0")):
        response = client.get(url, params=params, headers=OWNER)
        assert response.status_code == 422 and response.json()["detail"] == problem, response.text
    for params, field in (({}, "format"), ({"format": "onnx", "depth": "deep"}, "depth")):
        response = client.get(url, params=params, headers=OWNER)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"query.{field}: "), response.text
    assert client.get("/v1/models/digits/versions/2/export", params={"format": "onnx"},
                      headers=OWNER).status_code == 404
    other = client.get(url, params={"format": "onnx"}, headers=OTHER_TENANT)
    assert other.status_code == 404 and "no model 'digits' version 1" in other.json()["detail"]
    assert client.get(url, params={"format": "onnx"}).status_code == 401
