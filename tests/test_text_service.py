"""Text models through a real `al serve` (API + its worker, Redis as the broker): a text CSV uploaded, an LSTM
trained by a job, its class names in the registry, texts in and labels out of the native predict and of the
Open Inference Protocol v2 (BYTES, with Triton's own client, JSON and binary), and the 4xx of bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from service_support import (
    digits_rows,
    drop_queue,
    free_port,
    fresh_redis,
    register_model,
    service_env,
    sse_events,
    start_server,
    use_env,
)
from test_text import synthetic_texts, write_csv

from al.config import make_config
from al.run import train

LSTM = {"arch": "lstm", "embedding_dim": 16, "widths": [8, 8], "target_width": 12, "max_tokens": 24,
        "vocab_size": 200}
CLASSES = ["food", "sports", "tech"]
TEXTS = ["the team and the ball, a goal", "linux kernel code", "bread and soup"]


def train_by_job(client: httpx.Client, process, upload: tuple[str, bytes], name: str, model: dict) -> dict:
    """The dataset `upload` (file name, content) as POST /v1/datasets answered it, after a job trained `model`
    on it under `name`."""
    uploaded = client.post("/v1/datasets", files={"file": upload})
    assert uploaded.status_code == 201, uploaded.text
    spec = {"dataset": uploaded.json()["id"], "name": name, "model": model,
            "training": {"epochs": 2, "batch_size": 16, "lr": 0.01}}
    job = client.post("/v1/jobs", json=spec)
    assert job.status_code == 202, job.text
    with client.stream("GET", f"/v1/jobs/{job.json()['id']}/events", timeout=120) as response:
        sse_events(response)
    finished = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert finished["status"] == "succeeded", (finished["error"], process.output()[-3000:])
    return uploaded.json()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`al serve` with "digits" (an image model) registered, "texts", an LSTM trained by a job from an uploaded
    text CSV, and "levels", an MLP trained from a table whose classes have names; (client, the text dataset as
    the upload answered it)."""
    root = tmp_path_factory.mktemp("text-service")
    train("digits", root / "digits", make_config(model={"arch": "mlp", "widths": [16], "target_width": 8},
                                                 training={"epochs": 1, "device": "cpu"}))
    env = service_env(root / "data", fresh_redis())
    (root / "data").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        register_model(use_env(patch, env), root / "digits")
    port = free_port()
    process = start_server(env, root / "serve.log", port)
    csv_bytes = write_csv(root / "texts.csv", synthetic_texts(240)).read_bytes()
    table = "a,b,label\n" + "".join(f"{i % 7},{i % 5},{'high' if i % 7 > 3 else 'low'}\n" for i in range(120))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        dataset = train_by_job(client, process, ("texts.csv", csv_bytes), "texts", LSTM)
        train_by_job(client, process, ("levels.csv", table.encode()), "levels",
                     {"arch": "mlp", "widths": [8], "target_width": 4})
        yield client, dataset
    process.stop()
    drop_queue(env)


def test_a_text_csv_uploads_and_trains_an_lstm_whose_registry_entry_reads_text(served):
    client, dataset = served
    assert (dataset["input_kind"], dataset["rows"], dataset["shape"], dataset["classes"]) == ("text", 240, [], CLASSES)
    version = client.get("/v1/models/texts").json()["versions"][0]
    assert (version["input_kind"], version["classes"], version["input_shape"]) == ("text", CLASSES, [24])
    digits = client.get("/v1/models/digits").json()["versions"][0]
    assert digits["input_kind"] == "tensor"


def test_bad_text_uploads_and_mismatched_jobs_are_refused_naming_the_problem(served):
    client, dataset = served
    latin1 = "text,label\ncafé crème,food\n".encode("latin-1")
    empty = b"text,label\n,food\n  ,tech\n"
    for content, problem in ((latin1, "not UTF-8"), (empty, "text column 'text' is empty")):
        refused = client.post("/v1/datasets", files={"file": ("bad.csv", content)})
        assert refused.status_code == 422 and problem in refused.json()["detail"], refused.text
    mlp = client.post("/v1/jobs", json={"dataset": dataset["id"], "model": {"arch": "mlp"}})
    assert mlp.status_code == 422 and "arch mlp reads numbers, the dataset holds texts" in mlp.text
    lstm = client.post("/v1/jobs", json={"dataset": "digits", "model": {"arch": "lstm"}})
    assert lstm.status_code == 422 and "arch lstm reads texts, the dataset holds numbers" in lstm.text
    study = client.post("/v1/studies", json={"name": "s", "dataset": dataset["id"], "base": {"model": {"arch": "mlp"}},
                                             "space": {"training.lr": {"type": "float", "low": 0.001, "high": 0.1}},
                                             "trials": 2})
    assert study.status_code == 422 and "arch mlp reads numbers, the dataset holds texts" in study.text, study.text


def test_native_predict_answers_indices_labels_and_probabilities(served):
    client, _ = served
    long_text = "cook soup " * 5000  # far past max_tokens: the model reads its first 24 tokens
    answer = client.post("/v1/models/texts/predict", json={"inputs": [*TEXTS, long_text, ""]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["labels"] == [CLASSES[p] for p in body["predictions"]] and len(body["labels"]) == 5
    assert all(abs(sum(p) - 1) < 1e-4 and len(p) == 3 for p in body["probabilities"])
    with ThreadPoolExecutor(len(TEXTS)) as pool:  # concurrent requests, which the server may batch together
        alone = list(pool.map(lambda text: client.post("/v1/models/texts/predict", json={"inputs": [text]}).json(),
                              TEXTS))
    assert [a["labels"][0] for a in alone] == body["labels"][:3]
    np.testing.assert_allclose([a["probabilities"][0] for a in alone], body["probabilities"][:3], atol=1e-5)
    by_depth = [client.post("/v1/models/texts/predict", json={"inputs": TEXTS, "depth": k}).json()["depths"]
                for k in (1, 2)]
    assert by_depth == [[1, 1, 1], [2, 2, 2]]
    surrogate = client.post("/v1/models/texts/predict", content='{"inputs": ["fine", "half \\ud800 a pair"]}',
                            headers={"Content-Type": "application/json"})  # JSON may escape a lone surrogate
    assert surrogate.status_code == 422 and "text 1 is not valid Unicode" in surrogate.json()["detail"], surrogate.text
    numbers = client.post("/v1/models/texts/predict", json={"inputs": [[0.5] * 24]})
    assert numbers.status_code == 422 and "reads texts" in numbers.json()["detail"], numbers.text
    text_to_image = client.post("/v1/models/digits/predict", json={"inputs": TEXTS})
    assert text_to_image.status_code == 422 and "not text" in text_to_image.json()["detail"], text_to_image.text
    digits = client.post("/v1/models/digits/predict", json={"inputs": digits_rows(2)}).json()
    assert digits["labels"] is None and all(p in range(10) for p in digits["predictions"])
    levels = client.post("/v1/models/levels/predict", json={"inputs": [[6, 0], [0, 1]]}).json()  # a table
    assert levels["labels"] == [["high", "low"][p] for p in levels["predictions"]], levels


def test_tritonclient_sends_bytes_tensors_as_json_and_binary(served):
    import tritonclient.http as triton

    client, _ = served
    native = client.post("/v1/models/texts/predict", json={"inputs": TEXTS}).json()
    triton_client = triton.InferenceServerClient(str(client.base_url).removeprefix("http://").rstrip("/"))
    metadata = triton_client.get_model_metadata("texts")
    assert metadata["inputs"][0]["datatype"] == "BYTES" and metadata["inputs"][0]["shape"] == [-1]
    assert [o["name"] for o in metadata["outputs"]] == ["predictions", "labels", "probabilities", "depths"]
    texts = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    for binary in (False, True):
        tensor = triton.InferInput("input", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(texts, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("predictions", "labels")]
        result = triton_client.infer("texts", [tensor], outputs=outputs)
        assert result.as_numpy("predictions").tolist() == native["predictions"]
        assert [label.decode() if isinstance(label, bytes) else label
                for label in result.as_numpy("labels").tolist()] == native["labels"]
    numbers = triton.InferInput("input", [1, 24], "FP32")
    numbers.set_data_from_numpy(np.zeros((1, 24), np.float32), binary_data=True)
    with pytest.raises(triton.InferenceServerException, match="reads texts"):
        triton_client.infer("texts", [numbers])
    text_to_image = triton.InferInput("input", [len(TEXTS)], "BYTES")
    text_to_image.set_data_from_numpy(texts, binary_data=True)
    with pytest.raises(triton.InferenceServerException, match="not text"):
        triton_client.infer("digits", [text_to_image])
    triton_client.close()


def test_malformed_binary_bytes_are_a_400(served):
    client, _ = served
    header = (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", '
              b'"parameters": {"binary_data_size": 9}}]}')
    body = header + (3).to_bytes(4, "little") + b"abc" + b"\x05\x00"  # the second element's length is cut short
    answer = client.post("/v2/models/texts/infer", content=body,
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert answer.status_code == 400 and "BYTES element 1 runs past" in answer.json()["error"], answer.text
