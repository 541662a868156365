import gzip
import struct

import numpy as np
import pytest

import al.data
from al.cli import main
from al.data import DataError, load_dataset, read_inputs, summarize


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _rng_samples(n=40, features=5, classes=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype(np.float32), np.arange(n) % classes


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _npz(p / "d.npz", x=np.full((40, 5), np.nan), y=np.arange(40) % 2), "NaN or infinity"),
        (lambda p: _npz(p / "d.npz", x=np.full((40, 5), np.inf), y=np.arange(40) % 2), "NaN or infinity"),
        (lambda p: _npz(p / "d.npz", x=np.zeros((40, 5)), y=np.arange(40) % 2 + 0.5), "labels must be integers"),
        (lambda p: _npz(p / "d.npz", x=np.zeros((40, 5)), y=np.zeros(40)), "only one class"),
        (lambda p: _npz(p / "d.npz", x=np.zeros((40, 5)), y=np.arange(39) % 2), "40 samples but 39 labels"),
        (lambda p: _npz(p / "d.npz", x=np.zeros(40), y=np.arange(40) % 2), "features must have shape"),
        (lambda p: _npz(p / "d.npz", x=np.zeros((0, 5)), y=np.zeros(0)), "no samples"),
        (lambda p: _npz(p / "d.npz", x=np.zeros((40, 5)), y=np.zeros((40, 2))), "one value per sample"),
        (lambda p: _npz(p / "d.npz", features=np.zeros((40, 5))), "lacks array"),
        (lambda p: _npz(p / "d.npz", x=np.array([{"a": 1}] * 40, dtype=object), y=np.arange(40) % 2), "unreadable"),
        (lambda p: (p / "d.npz").write_bytes(b"not a zip archive"), "not a readable .npz"),
        (lambda p: (p / "d.csv").write_text(""), "is empty"),
        (lambda p: (p / "d.csv").write_text("a,b,label\n"), "header row and at least one data row"),
        (lambda p: (p / "d.csv").write_text("a,b,label\n1,2,0\n3,x,1\n"), "line 3: a feature value is not a number"),
        (lambda p: (p / "d.csv").write_text("a,b,label\n1,2,0\n3,1\n"), "line 3: 2 fields, the header has 3"),
        (lambda p: (p / "d.csv").write_bytes(b"a,label\n\xff\xfe,1\n"), "not UTF-8"),
        (lambda p: (p / "d.txt").write_text("1 2 3"), "unknown dataset"),
    ],
)
@pytest.mark.parametrize("read", ["load", "summarize"])
def test_bad_files_raise_an_error_that_names_the_problem(tmp_path, make, message, read):
    """The same checks whether a worker loads the file or a server summarizes an upload of it."""
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(DataError, match=message):
        load_dataset(str(path)) if read == "load" else summarize(path, 2**30, 1000)


def _summary_of_loaded(path):
    data = load_dataset(str(path))
    return len(data.train_x) + len(data.test_x), data.input_shape, data.classes


@pytest.mark.parametrize(
    "write",
    [
        lambda p: _npz(p / "d.npz", x=np.arange(40 * 6, dtype=np.uint8).reshape(40, 2, 3), y=np.arange(40) % 3),
        lambda p: _npz(p / "d.npz", x=np.asfortranarray(np.ones((40, 5))), y=(np.arange(40) % 2).astype(str)),
        lambda p: (p / "d.csv").write_text("a,label,b\n" + "".join(f"{i},{i % 2}{'.0' * (i % 3 == 0)},{-i}\n"
                                                                     for i in range(300))),
        lambda p: (p / "d.csv").write_text('x,label\n' + "".join(f'{i},"c #{i % 3}"\n' for i in range(300))),
    ],
)
def test_summary_agrees_with_the_loaded_dataset(tmp_path, monkeypatch, write):
    monkeypatch.setattr(al.data, "CSV_CHUNK_BYTES", 256)  # many chunks: the counts must add up across them
    monkeypatch.setattr(al.data, "NPZ_CHUNK_BYTES", 64)
    write(tmp_path)
    path = next(tmp_path.iterdir())
    summary = summarize(path, 2**30, 1000)
    assert (summary.rows, summary.input_shape, summary.classes) == _summary_of_loaded(path)


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((4096, 4096), dtype=np.float32), y=np.arange(4096) % 2)  # 64 MiB of zeros
    assert path.stat().st_size < 2**20
    with pytest.raises(DataError, match=r"array x decompresses to \d+ bytes, over the limit of 1048576"):
        summarize(path, 2**20, 1000)


def test_too_many_classes_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("a,label\n" + "".join(f"{i},{i}\n" for i in range(50)))
    with pytest.raises(DataError, match="more than 10 classes"):
        summarize(tmp_path / "d.csv", 2**30, 10)


def test_missing_builtin_dataset_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AL_DATASETS_DIR", str(tmp_path))
    if all((d / "train-images-idx3-ubyte.gz").exists() for d in [tmp_path / "kmnist"]):
        pytest.skip("kmnist is installed")
    with pytest.raises(DataError, match=rf"put train-images-idx3-ubyte.gz.*{tmp_path}/kmnist"):
        load_dataset("kmnist")


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_dataset_is_read_from_the_datasets_dir(tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (30, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    monkeypatch.setenv("AL_DATASETS_DIR", str(tmp_path))
    data = load_dataset("mnist")
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train_x) == 30 and len(data.test_x) == 10
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable IDX file"):
        load_dataset("mnist")


def test_csv_uses_the_label_column_and_string_labels(tmp_path):
    rows = ["label,a,b"] + [f"{'cat' if i % 2 else 'dog'},{i},{i * 2}" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(str(tmp_path / "d.csv"))
    assert data.classes == ["cat", "dog"] and data.input_shape == (2,)
    assert len(data.train_x) + len(data.test_x) == 20
    inputs = read_inputs(tmp_path / "d.csv")  # the label column is dropped for prediction
    assert inputs.shape == (20, 2)


def test_cli_train_on_bad_data_fails_clearly_and_writes_nothing(tmp_path, capsys):
    x, _ = _rng_samples()
    _npz(tmp_path / "bad.npz", x=x, y=np.zeros(len(x)))
    out = tmp_path / "model"
    code = main(["train", "--dataset", str(tmp_path / "bad.npz"), "--out", str(out), "--epochs", "1", "--quiet"])
    assert code == 2
    assert "only one class" in capsys.readouterr().err
    assert not out.exists()


def test_cli_rejects_an_architecture_that_does_not_fit_the_data(tmp_path, capsys):
    x, y = _rng_samples()
    _npz(tmp_path / "table.npz", x=x, y=y)
    code = main(["train", "--dataset", str(tmp_path / "table.npz"), "--arch", "cnn", "--out", str(tmp_path / "m")])
    assert code == 2
    assert "needs image input" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
