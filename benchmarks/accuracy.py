"""`al bench accuracy`: AL next to BP on one dataset and architecture, last-epoch test accuracy and time; on texts,
with the classical reference beside them: TF-IDF and logistic regression on the same splits."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import Destination, destination, mean_sd, publish
from benchmarks.runs import subset_file

TFIDF = "tf-idf + logistic regression"
TFIDF_C = (1.0, 3.0, 10.0, 30.0)  # logistic regression's inverse regularisation, chosen on the validation split


def tfidf_reference(data, val_fraction: float, seed: int, model=None) -> dict:
    """TF-IDF of words and word pairs (sublinear counts, terms seen twice or more) and logistic regression, fitted on
    the training split the models train on (the validation rows carved as theirs are), C chosen on the validation
    split; the test accuracy of that C. With a text `model` config: of what such a model reads of each text, its
    tokenizer's first max_tokens tokens (unknown words as one UNK), so that truncation's cost shows apart."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from al.data import carve_validation
    from al.data.text import PAD, TextEncoding

    started = time.perf_counter()
    train_rows, val_rows = carve_validation(len(data.train_x), val_fraction, seed)
    train_texts, val_texts, test_texts = data.train_x[train_rows], data.train_x[val_rows], data.test_x
    if model is not None:
        encoding = TextEncoding.fit(train_texts, model.vocab_size, model.max_tokens)

        def read(texts):
            return [" ".join(t for t in e.tokens if t != PAD) for e in encoding.tokenizer.encode_batch(list(texts))]

        train_texts, val_texts, test_texts = read(train_texts), read(val_texts), read(test_texts)
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    train_x = vectorizer.fit_transform(train_texts)
    val_x, test_x = vectorizer.transform(val_texts), vectorizer.transform(test_texts)
    fitted = [LogisticRegression(C=c, max_iter=2000).fit(train_x, data.train_y[train_rows]) for c in TFIDF_C]
    best = max(fitted, key=lambda model: model.score(val_x, data.train_y[val_rows]))
    return {"test_accuracy": best.score(test_x, data.test_y), "val_accuracy": best.score(val_x, data.train_y[val_rows]),
            "C": best.C, "train_seconds": time.perf_counter() - started, "epochs": 1}


def bench_accuracy(args) -> None:
    import torch

    from al.checkpoint import METRICS
    from al.config import make_config
    from al.data import TEXT, load_dataset
    from al.run import train

    if args.threads:
        torch.set_num_threads(args.threads)
    label = args.name or Path(args.dataset).stem
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset(str(subset_file(args.dataset, args.samples, Path(tmp))) if args.samples else args.dataset)
    # The presets, model and training fields and lr name the table unless they are `default` alone, whose tables came
    # first.
    fields = sorted({**args.model, **args.training}.items())
    variant = [f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in fields]
    variant += [f"lr={args.lr:g}"] if args.lr else []
    name = "-".join(["accuracy", label, *([f"{args.samples}"] if args.samples else []), args.arch, *variant,
                     *sorted(set(args.presets) - {"default"}), *(args.methods if len(args.methods) == 1 else [])])
    runs: dict[str, list[dict]] = {}
    if data.input_kind == TEXT:
        config = make_config("default", {**args.model, "arch": args.arch})
        val_fraction, model = config.training.val_fraction, config.model
        runs[TFIDF] = [tfidf_reference(data, val_fraction, seed) for seed in range(args.seeds)]
        runs[f"{TFIDF}, first {model.max_tokens} tokens"] = [tfidf_reference(data, val_fraction, seed, model)
                                                             for seed in range(args.seeds)]
    for preset in args.presets:
        for method in args.methods:
            key = f"{method}/{preset}"
            runs[key] = []
            for seed in range(args.seeds):
                training = {"method": method, "epochs": args.epochs, "seed": seed, "device": args.device,
                            "batch_size": args.batch_size, "lr": args.lr, **args.training}
                with tempfile.TemporaryDirectory() as out:
                    result = train(data, out, make_config(preset, {**args.model, "arch": args.arch}, training))
                    result["val_accuracy_by_epoch"] = [json.loads(line)["val_accuracy"]
                                                       for line in (Path(out) / METRICS).read_text().splitlines()]
                runs[key].append(result)
                print(f"{key} seed {seed}: test_accuracy {result['test_accuracy']:.4f} "
                      f"({result['train_seconds']:.1f}s)", file=sys.stderr)
                # After every run, so that an interrupted benchmark still publishes what it measured.
                publish_accuracy(destination(args), name, label, " ".join([args.arch, *variant]), args.epochs, runs)


def publish_accuracy(where: Destination, name: str, dataset: str, arch: str, epochs: int, runs: dict[str, list[dict]],
                     **record) -> None:
    """The table of `runs` (method/preset -> per-seed results with test_accuracy, train_seconds, epochs)."""
    rows = []
    for key, results in runs.items():
        if not results:
            continue
        acc_mean, acc_sd = mean_sd([100 * r["test_accuracy"] for r in results])
        sec_mean, sec_sd = mean_sd([r["train_seconds"] / r["epochs"] for r in results])
        first = [100 * r["val_accuracy_by_epoch"][0] for r in results if r.get("val_accuracy_by_epoch")]
        rows.append({
            "method / preset": key,
            "test accuracy % (last epoch)": f"{acc_mean:.2f} +- {acc_sd:.2f}",
            "validation % after epoch 1": "{:.2f} +- {:.2f}".format(*mean_sd(first)) if first else "",
            "seconds / epoch": f"{sec_mean:.2f} +- {sec_sd:.2f}" + (" (fit, all C)" if key.startswith(TFIDF) else ""),
            "runs": len(results),
        })
    publish(
        where,
        name=name,
        title=f"Accuracy: AL vs BP, {dataset}, {arch}, {epochs} epochs",
        columns=["method / preset", "test accuracy % (last epoch)", "validation % after epoch 1", "seconds / epoch",
                 "runs"],
        rows=rows,
        notes="BP trains the inference path (f_1..f_L -> b_L -> h_L..h_1) with cross-entropy, on its preset's network "
        "(the cnn's `default` gives AL a network of its own). "
        "Mean +- sample standard deviation over seeds 0..runs-1; test accuracy of the last epoch."
        + (f" {TFIDF}: fitted on each seed's training split, C in {list(TFIDF_C)} chosen on its validation split "
           "(benchmarks/accuracy.py, tfidf_reference); 'first N tokens': of the tokens the model reads, from a "
           "tokenizer of its settings fitted on that split." if TFIDF in runs else ""),
        raw={"runs": runs, **record},
    )
