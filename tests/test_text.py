"""Text models (arch lstm, transformer): text CSVs, the tokenizer, the sequence components, and one test for each
bug of the reference code (Hibb-bb/AL) that issue 21 lists, so that none comes back.

The main tests read a small CSV they write themselves; one also reads a few hundred rows of the Debian packages
set (../shared/datasets/debian-packages) where it is present.
"""

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import al, last_json
from test_pipeline import assert_same_training

from al.checkpoint import load_model
from al.config import make_config
from al.data import (
    TEXT,
    DataError,
    Dataset,
    TextEncoding,
    carve_validation,
    load_dataset,
    prepare_splits,
    read_inputs,
    summarize,
)
from al.data.text import PAD_ID, UNK_ID
from al.model import build_network
from al.pipeline import pipeline_runner
from al.run import evaluate, train
from al.sequence import MaskedMeanPool, with_mask
from al.trainer import Trainer

KEYWORDS = {"sports": "goal match team ball score referee", "tech": "code chip server linux compiler kernel",
            "food": "soup bread salt cook taste recipe"}
COMMON = "the a and of is very new with for this that it".split()
MODELS = {
    "lstm": {"arch": "lstm", "embedding_dim": 16, "widths": [8, 8, 8], "target_width": 12, "max_tokens": 24,
             "vocab_size": 200},
    "transformer": {"arch": "transformer", "embedding_dim": 16, "heads": 2, "widths": [16, 16, 16],
                    "target_width": 12, "max_tokens": 24, "vocab_size": 200},
}
TRAINING = {"epochs": 2, "batch_size": 32, "device": "cpu", "stage_threads": 1, "stage_timeout": 60}
DEBIAN = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "debian-packages" / "train.csv"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the pipelines' bit-identity needs it, and models this small run fastest on one (a
    recurrent layer's many small steps wait on each other's threads, more so on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_texts(rows: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label): each text mixes 2-6 words of its class with 1-14 common ones; some hold commas and quotes."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        label = list(KEYWORDS)[i % 3]
        words = rng.choices(KEYWORDS[label].split(), k=rng.randint(2, 6)) + rng.choices(COMMON, k=rng.randint(1, 14))
        rng.shuffle(words)
        text = " ".join(words)
        if i % 7 == 0:
            text = f'{text}, "quoted", and\na second line'
        out.append((text, label))
    return out


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("texts") / "texts.csv", synthetic_texts(240))


@pytest.fixture(scope="module")
def texts(texts_csv) -> Dataset:
    return load_dataset(texts_csv)


def net_for(arch: str, method: str = "al", seed: int = 0, **model):
    config = make_config("default", {**MODELS[arch], **model})
    torch.manual_seed(seed)
    return build_network(config.model, (config.model.max_tokens,), 3, method)


def encoded(data: Dataset, arch: str) -> torch.Tensor:
    cfg = MODELS[arch]
    return TextEncoding.fit(data.train_x, cfg["vocab_size"], cfg["max_tokens"]).apply(data.test_x)


# --- data --------------------------------------------------------------------------------


def test_a_csv_with_a_text_column_is_a_text_dataset_with_class_names(texts_csv, texts):
    assert texts.input_kind == TEXT and texts.classes == ["food", "sports", "tech"]  # sorted
    assert len(texts.train_x) + len(texts.test_x) == 240 and np.bincount(texts.test_y).tolist() == [16, 16, 16]
    assert "\na second line" in next(t for t in texts.train_x if "quoted" in t)  # quoted fields read whole
    summary = summarize(texts_csv, 2**30, 100)
    assert (summary.rows, summary.input_shape, summary.classes, summary.input_kind) == (240, (), texts.classes, TEXT)


def test_another_column_name_holds_the_texts(tmp_path):
    path = write_csv(tmp_path / "d.csv", [(label, text, i) for i, (text, label) in enumerate(synthetic_texts(60))],
                     header=("label", "body", "id"))
    with pytest.raises(DataError, match="fields"):
        load_dataset(path)  # without the column's name, a table of numbers (which this is not)
    data = load_dataset(path, text_column="body")
    assert data.input_kind == TEXT and data.classes == ["food", "sports", "tech"]  # `label` chosen, not `id`


@pytest.mark.parametrize("content, message", [
    (b"text,label\nfine words,a\n\xff\xfe bad bytes,b\n", "not UTF-8"),
    (b"text,label\n,a\n ,b\n,a\n", "the text column 'text' is empty"),
    (b"text,label\nsome words,a\nmore words, \n", "line 3: the label is empty"),
    (b"text,label\nsome words,a\nmore,words,b\n", "line 3: 3 fields, the header has 2"),
    (b"text\nsome words\n", "needs a label column"),
    (b"text,label\n", "needs a header row and at least one data row"),
])
@pytest.mark.parametrize("read", ["load", "summarize"])
def test_bad_text_files_raise_an_error_that_names_the_problem(tmp_path, content, message, read):
    (tmp_path / "d.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "d.csv") if read == "load" else summarize(tmp_path / "d.csv", 2**30, 100)


def test_inputs_to_predict_come_from_the_text_column_or_one_text_per_line(tmp_path, texts_csv):
    from_csv = read_inputs(texts_csv)
    assert len(from_csv) == 240 and all(isinstance(t, str) for t in from_csv)
    (tmp_path / "in.txt").write_text("first text\n\nsecond, text\n")
    assert read_inputs(tmp_path / "in.txt").tolist() == ["first text", "second, text"]


# --- the reference code's bugs, one test each ------------------------------------------


def test_truncation_counts_tokens_not_characters():
    encoding = TextEncoding.fit(["supercalifragilistic antidisestablishment pneumonoultramicroscopic",
                                 "a b c d e f g h i j"], vocab_size=100, max_tokens=5)
    long_words, many_words = encoding.apply(["supercalifragilistic antidisestablishment pneumonoultramicroscopic",
                                             "a b c d e f g h i j"])
    assert (long_words != PAD_ID).sum() == 3 and UNK_ID not in long_words  # 65 characters, 3 whole tokens
    vocab = encoding.tokenizer.get_vocab()
    assert many_words.tolist() == [vocab[w] for w in "abcde"]  # 10 tokens cut after 5


def test_the_vocabulary_comes_from_the_training_split_only():
    train_texts = ["alpha beta"] * 20
    val_rows = carve_validation(20, 0.25, seed=3)[1]
    for row in val_rows:
        train_texts[row] = "alpha validationword"
    data = Dataset(np.array(train_texts, dtype=object), np.arange(20) % 2, np.array(["alpha testword"] * 4,
                                                                                   dtype=object),
                   np.arange(4) % 2, ["x", "y"], "d")
    splits = prepare_splits(data, 0.25, seed=3, vocab_size=100, max_tokens=4)
    vocab = splits.encoding.tokenizer.get_vocab()
    assert "alpha" in vocab and "beta" in vocab
    assert "validationword" not in vocab and "testword" not in vocab
    assert splits.test_x[0, 1] == UNK_ID and all(splits.val_x[:, 1] == UNK_ID)


def test_no_model_selection_on_the_test_set(tmp_path, texts):
    """The result's test accuracy is the last epoch's model's (the one saved), and no epoch records one."""
    result = train(texts, tmp_path / "m", make_config("default", MODELS["lstm"], {**TRAINING, "epochs": 3}))
    assert evaluate(tmp_path / "m", texts)["test_accuracy"] == result["test_accuracy"]
    history = [line for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and not any("test" in line for line in history)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_padding_never_enters_a_pooled_representation_or_an_lstm_state(texts, arch):
    net = net_for(arch).eval()
    ids = encoded(texts, arch)
    lengths = (ids != PAD_ID).sum(dim=1)
    short, long = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[short] < lengths[long]
    for depth in range(1, net.depth + 1):
        alone = net(ids[[short]], depth)  # no padding: the batch is as long as the text
        padded = net(ids[[short, long]], depth)[0]  # padded up to the long text
        assert torch.allclose(alone[0], padded, atol=1e-5), depth
    pool = MaskedMeanPool()
    mask = torch.tensor([[True, True, False]])
    garbage = with_mask(mask, torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1e6, float("nan")]]]))
    assert pool(garbage).tolist() == [[2.0, 3.0]]


def test_an_lstm_layer_sees_the_same_state_in_training_and_at_inference(texts):
    """In training every component starts from s_{i-1} alone; inference runs the same encoders on the same s."""
    net = net_for("lstm")
    ids, y = encoded(texts, "lstm")[:16], torch.as_tensor(texts.test_y[:16])
    s, t = ids, F.one_hot(y, 3).float()
    trained = []
    for i, component in enumerate(net.components):
        s, t, _, _ = component.local_losses(s, t, y, i == 0, "mse", True)
        trained.append(s)
    s = ids
    for component, s_trained in zip(net.components, trained):
        s = component.encoder(s)
        assert torch.equal(s, s_trained)
    assert torch.equal(net(ids), net.head(trained[-1], net.depth))


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_the_label_encoder_learns_from_the_associated_loss_unless_detach_target(texts, arch):
    net = net_for(arch)
    ids, y = encoded(texts, arch)[:8], torch.as_tensor(texts.test_y[:8])
    for detach, learns in ((False, True), (True, False)):
        net.zero_grad(set_to_none=True)
        s, t = ids, F.one_hot(y, 3).float()
        for i, component in enumerate(net.components):
            s, t, associated, _ = component.local_losses(s, t, y, i == 0, "mse", detach)
            associated.backward()
            grads = [p.grad for p in component.target_encoder.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads) if learns else all(g is None for g in grads)


def test_the_transformer_has_positional_information(texts):
    """Without positions, attention and a mean are blind to order: two tokens swapped would read the same."""
    net = net_for("transformer").eval()
    ids = encoded(texts, "transformer")[:8]
    swapped = ids.clone()
    swapped[:, [0, 1]] = ids[:, [1, 0]]  # the same tokens, two of them in each other's place
    differs = (ids[:, 0] != ids[:, 1]).nonzero().flatten()
    assert len(differs) > 0

    def pooled(x):
        s = x
        for component in net.components:
            s = component.encoder(s)
        return MaskedMeanPool()(s)[differs]

    assert not torch.allclose(pooled(ids), pooled(swapped), atol=1e-3)
    net.components[0].encoder.positions = None  # the reference code's transformer
    assert torch.allclose(pooled(ids), pooled(swapped), atol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_bp_gets_exactly_the_embedding_al_gets(texts, arch):
    al_net, bp_net = net_for(arch, "al", seed=5), net_for(arch, "bp", seed=5)
    al_embedding = al_net.components[0].encoder.embedding.weight
    bp_embedding = bp_net.components[0].encoder.embedding.weight
    assert torch.equal(al_embedding, bp_embedding) and bp_embedding.requires_grad
    assert [(n, p.shape) for n, p in al_net.named_parameters()] == [(n, p.shape) for n, p in bp_net.named_parameters()]
    config = make_config("default", MODELS[arch], {**TRAINING, "method": "bp", "epochs": 1})
    splits = prepare_splits(texts, 0.1, 0, MODELS[arch]["vocab_size"], MODELS[arch]["max_tokens"])
    Trainer(bp_net, config.model, config.training, splits).fit()
    assert not torch.equal(al_embedding, bp_embedding)  # BP trains it, end to end


# --- pipelines, shortcuts, early exit ------------------------------------------------------


def text_trainer(data: Dataset, arch: str, **training) -> Trainer:
    config = make_config("default", MODELS[arch], {**TRAINING, **training})
    model_cfg, train_cfg = config.model, config.training
    torch.manual_seed(train_cfg.seed)
    splits = prepare_splits(data, train_cfg.val_fraction, train_cfg.seed, model_cfg.vocab_size, model_cfg.max_tokens)
    net = build_network(model_cfg, tuple(splits.train_x.shape[1:]), data.num_classes, "al")
    return Trainer(net, model_cfg, train_cfg, splits, runner=pipeline_runner(train_cfg))


@pytest.mark.parametrize("arch, mode, stages", [("lstm", "threads", "0,1,2,3"), ("lstm", "processes", "0-1,2-3"),
                                                ("transformer", "threads", "0-1,2-3"),
                                                ("transformer", "processes", "0,1,2,3")])
def test_pipelined_text_models_train_bit_identical_to_sequential(one_thread, texts, arch, mode, stages):
    reference = text_trainer(texts, arch)
    reference.fit()
    piped = text_trainer(texts, arch, pipeline=mode, devices=["cpu"] * len(stages.split(",")), stages=stages)
    assert piped.fit()["status"] == "completed"
    assert_same_training(reference, piped)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_shortcut_inference_at_every_depth_and_early_exit(texts, arch):
    trainer = text_trainer(texts, arch)
    trainer.fit()
    net, ids = trainer.net.eval(), trainer.splits.test_x
    by_depth = [net.predict(ids, k)[1] for k in range(1, net.depth + 1)]
    for probabilities in by_depth:
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(ids)))
    at_zero = net.predict(ids, exit_confidence=0.0)
    assert at_zero[2].tolist() == [1] * len(ids) and torch.equal(at_zero[1], by_depth[0])
    threshold = float(by_depth[0].amax(dim=1).median())
    _, probabilities, depths = net.predict(ids, exit_confidence=threshold)
    assert 0 < (depths == 1).sum() < len(ids)  # rows leave the batch at different depths
    for row in range(len(ids)):
        assert torch.allclose(probabilities[row], by_depth[int(depths[row]) - 1][row], atol=1e-5)


# --- model directories and the command line ---------------------------------------------------


def test_a_saved_text_model_predicts_label_names_as_before(tmp_path, texts):
    out = tmp_path / "m"
    train(texts, out, make_config("default", MODELS["transformer"], TRAINING))
    assert (out / "tokenizer.json").is_file()
    model = load_model(out)
    assert model.input_kind == TEXT and model.classes == ["food", "sports", "tech"]
    inputs = list(texts.test_x[:20]) + ["cook " * 500, ""]  # far past max_tokens (cut), and no token at all
    again_model = load_model(out)
    first = model.predict(model.request(inputs))
    again = again_model.predict(again_model.request(np.array(inputs, dtype=object)))
    assert first == again and set(first.classes) <= set(model.classes) and len(first.classes) == 22
    with pytest.raises(ValueError, match="reads texts"):
        model.request(np.zeros((2, 24)))
    with pytest.raises(ValueError, match="reads texts"):
        model.request("one string, not a list")


def test_a_number_model_refuses_texts_and_a_text_model_numbers(tmp_path, texts):
    with pytest.raises(DataError, match="holds texts: train it with arch lstm or transformer"):
        train(texts, tmp_path / "a", make_config("default", {"arch": "mlp"}, TRAINING))
    digits = load_dataset("digits")
    with pytest.raises(DataError, match="holds numbers; arch lstm reads texts"):
        train(digits, tmp_path / "b", make_config("default", {"arch": "lstm"}, TRAINING))
    train(digits, tmp_path / "c", make_config("default", {"arch": "mlp", "widths": [8]}, {**TRAINING, "epochs": 1}))
    with pytest.raises(ValueError, match="reads numbers"):
        load_model(tmp_path / "c").request(["some text"])


def test_the_command_line_trains_evaluates_and_predicts_label_names(tmp_path, texts_csv):
    out = str(tmp_path / "m")
    trained = last_json(al("train", "--dataset", str(texts_csv), "--arch", "lstm", "--embedding-dim", "16",
                           "--widths", "8", "--max-tokens", "24", "--vocab-size", "200", "--epochs", "10",
                           "--batch-size", "16", "--preset", "lean", "--lr", "0.01", "--json", "--out", out))
    assert trained["test_accuracy"] >= 0.8  # the keywords give each class away
    evaluated = last_json(al("eval", "--model", out, "--dataset", str(texts_csv), "--json"))
    assert evaluated["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    (tmp_path / "in.txt").write_text("the team and the ball, a goal\nlinux kernel code\nbread and soup\n")
    lines = al("predict", "--model", out, "--input", str(tmp_path / "in.txt")).stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["sports", "tech", "food"]
    from_csv = al("predict", "--model", out, "--input", str(texts_csv)).stdout.splitlines()
    assert len(from_csv) == 240


@pytest.mark.skipif(not DEBIAN.is_file(), reason="the Debian packages set (../shared) is not here")
def test_a_few_hundred_debian_package_descriptions(tmp_path):
    """Real texts (long, quoted, with URLs and punctuation), 10 classes: read, trained, saved and used as above.
    How well a model learns them is the benchmarks' business (docs/benchmarks.md)."""
    with open(DEBIAN, encoding="utf-8", newline="") as f:
        rows = [row for _, row in zip(range(301), csv.reader(f))]
    path = write_csv(tmp_path / "debian.csv", rows[1:], header=rows[0])
    data = load_dataset(path)
    assert data.input_kind == TEXT and len(data.train_x) + len(data.test_x) == 300
    assert set(data.classes) == {"admin", "fonts", "games", "graphics", "mail", "math", "science", "sound", "text",
                                 "web"}
    result = train(data, tmp_path / "m", make_config("default", {**MODELS["lstm"], "max_tokens": 64}, TRAINING))
    assert evaluate(tmp_path / "m", str(path))["test_accuracy"] == result["test_accuracy"]
    model = load_model(tmp_path / "m")
    assert set(model.predict(model.request(list(data.test_x))).classes) <= set(data.classes)
