"""`cliptune-eval`: a trained run scored from shards equals its in-training validation; precomputed
embeddings (npy, parquet) score exactly as `retrieval_metrics` on the same arrays; errors name the
file and the column."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cliptune.eval.runner import run
from cliptune.eval.embed import EmptyEvalSetError
from cliptune.eval.retrieval import retrieval_metrics
from cliptune.eval.runner import evaluate_embeddings, named_sets, results_table
from conftest import compose_train
from helpers_shards import make_sample, write_shards

TRAIN = ["experiment=smoke", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "data.num_samples=192", "data.val_samples=64"]


def synthetic_val_shards(out: Path, n: int = 64, seed: int = 0, per_shard: int = 24) -> Path:
    """The synthetic datamodule's validation set written as shards (lossless PNG, same keys,
    captions and labels), so shard evaluation sees exactly what in-training validation sees."""
    from cliptune.data.synthetic import N_CONCEPTS, caption, concept_name, render

    samples = []
    for i in range(n):
        h = zlib.crc32(f"{seed}/0/{i}".encode())  # SyntheticPairs._rand for train=False
        concept = h % N_CONCEPTS
        buf = io.BytesIO()
        render(concept, h).save(buf, format="png")
        samples.append(make_sample(f"{i:08d}", {"en": [caption(concept, 0), caption(concept, 1)]},
                                   ext="png", image=buf.getvalue(), label=concept_name(concept)))
    write_shards(out, samples, per_shard=per_shard, split="val")
    return out


def train_run(root: Path, name: str, *extra: str, subdir: str | None = None) -> Path:
    """A tiny real run in ``root/<subdir or name>`` (a multirun names its folders by the overrides)."""
    from cliptune.train.run import run as train

    cfg = compose_train([*TRAIN, f"out_root={root}", f"name={name}", *extra], run_dir=root / (subdir or name))
    return Path(train(cfg)["run_dir"])


def eval_cfg(out: Path, *overrides: str):
    return compose_train(["workers=0", "device=cpu", f"out={out}", *overrides], run_dir=out, config_name="eval")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalcli")
    return {"run": train_run(root, "clip", "eval.before=false", "checkpoint_every=6"),
            "shards": synthetic_val_shards(root / "shards"), "root": root}


def test_trained_run_dir_equals_in_training_validation(trained, tmp_path):
    run_dir, shards = trained["run"], trained["shards"]
    res = run(eval_cfg(tmp_path / "ev", f"load={run_dir}", f"+sets.synthetic={shards}", "batch_size=32"))
    after = json.loads((run_dir / "metrics.json").read_text())["after"]["synthetic"]
    got = res["synthetic"]["metrics"]
    assert set(got) == set(after) - {"loss"}  # the same metrics, zero-shot included
    for k, v in got.items():
        assert v == pytest.approx(after[k], abs=1e-6), k
    # files: results.json with chance level, per_query.pt in the trainer's format
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert doc["sets"]["synthetic"]["metrics"] == got
    assert doc["sets"]["synthetic"]["n_images"] == 64 and doc["sets"]["synthetic"]["n_texts"] == 128
    assert doc["sets"]["synthetic"]["chance"]["t2i_R@1"] == pytest.approx(1 / 64)
    pq_eval = torch.load(tmp_path / "ev" / "per_query.pt", weights_only=True)["synthetic"]
    pq_train = torch.load(run_dir / "per_query.pt", weights_only=True)["synthetic"]
    assert pq_eval["keys"] == pq_train["keys"] == [f"{i:08d}" for i in range(64)]
    for k in ("t2i_R@1", "t2i_R@5", "i2t_R@10", "t2i_rank", "i2t_rank", "zs_top1"):
        assert torch.equal(pq_eval[k], pq_train[k]), k


def test_checkpoint_and_export_give_the_same_numbers(trained, tmp_path):
    run_dir, shards = trained["run"], trained["shards"]
    a = run(eval_cfg(tmp_path / "a", f"load={run_dir / 'checkpoints' / 'last.ckpt'}", f"sets={shards}",
                     "zeroshot.enabled=false"))
    b = run(eval_cfg(tmp_path / "b", f"load=local-dir:{run_dir / 'export'}", f"sets={shards}",
                     "zeroshot.enabled=false"))
    assert list(a) == ["shards"]  # one spec alone is named after its folder
    assert a["shards"]["metrics"] == b["shards"]["metrics"]
    assert not any(k.startswith("zs_") for k in a["shards"]["metrics"])


def test_several_sets_and_caption_languages(trained, tmp_path):
    langs = ("en", "zh")
    samples = [make_sample(f"k{i:03d}", {"en": [f"a picture number {i}"], "zh": [f"图片 {i}"]}, i=i) for i in range(12)]
    samples[3] = make_sample("k003", {"en": ["only english here"]}, i=3)  # no zh caption: left out of :zh
    write_shards(tmp_path / "ml", samples, per_shard=5, split="val")
    # no zh captions at all in the synthetic set: the other sets are evaluated and written, then the
    # run fails naming the empty one (no empty result passes for a number)
    with pytest.raises(EmptyEvalSetError, match=r"set 'synthetic:zh': nothing usable .* 64 caption_lang"):
        run(eval_cfg(tmp_path / "ev", f"load={trained['run']}",
                     f"sets={{multi:{tmp_path / 'ml'},synthetic:{trained['shards']}}}", "caption_lang=[en,zh]"))
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    res = doc["sets"]
    assert doc["caption_lang"] == list(langs)
    assert set(res) == {"multi:en", "multi:zh", "multi:en~zh", "synthetic:en", "synthetic:zh"}  # + cross-lingual
    assert res["multi:en"]["n_images"] == 12 and res["multi:zh"]["n_images"] == 11
    # k003 has no zh caption: left out of multi:zh and counted under its reason
    assert res["multi:zh"]["skipped"]["caption_lang"] == 1 and res["multi:zh"]["n_skipped"] == 1
    assert res["multi:en"]["n_skipped"] == 0
    assert res["synthetic:en"]["n_texts"] == 128
    assert not res["synthetic:zh"]["metrics"] and res["synthetic:zh"]["n_skipped"] == 64


def _random_set(n_img=40, per=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, d, generator=g)
    owner = torch.arange(n_img).repeat_interleave(per)
    txt = img[owner] + 1.5 * torch.randn(n_img * per, d, generator=g)  # noisy: recall well below 1
    return img.numpy(), txt.numpy(), owner.numpy()


def test_precomputed_npy_equals_retrieval_metrics(tmp_path):
    img, txt, owner = _random_set()
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "txt.npy", txt)
    np.save(tmp_path / "t2i.npy", owner)
    res = run(eval_cfg(tmp_path / "ev", f"embeddings.images={tmp_path / 'img.npy'}",
                       f"embeddings.texts={tmp_path / 'txt.npy'}", f"embeddings.text_to_image={tmp_path / 't2i.npy'}"))
    ref = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(owner))
    assert res["embeddings"]["metrics"] == ref
    assert 0 < ref["t2i_R@1"] < 1
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert doc["sets"]["embeddings"]["metrics"] == ref and doc["sets"]["embeddings"]["n_texts"] == 80
    # one caption per image needs no mapping file
    one = evaluate_embeddings(str(tmp_path / "img.npy"), str(tmp_path / "img.npy"))
    assert one["metrics"]["t2i_R@1"] == 1.0


@pytest.mark.parametrize("fixed", [False, True])
def test_precomputed_parquet_with_ids_equals_retrieval_metrics(tmp_path, fixed):
    img, txt, owner = _random_set(seed=1)
    ids = [f"img-{i:03d}" for i in range(len(img))]
    perm = np.random.default_rng(0).permutation(len(txt))  # texts in any order, matched by id

    def col(a):
        return pa.array(list(a), type=pa.list_(pa.float32(), a.shape[1]) if fixed else pa.list_(pa.float32()))

    pq.write_table(pa.table({"id": ids, "embedding": col(img)}), tmp_path / "img.parquet")
    pq.write_table(pa.table({"image_id": [ids[o] for o in owner[perm]], "embedding": col(txt[perm])}),
                   tmp_path / "txt.parquet")
    res = run(eval_cfg(tmp_path / "ev", f"embeddings.images={tmp_path / 'img.parquet'}",
                       f"embeddings.texts={tmp_path / 'txt.parquet'}", "embeddings.name=ext"))
    ref = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt[perm]), torch.from_numpy(owner[perm]))
    assert res["ext"]["metrics"] == ref
    assert res["ext"]["keys"] == ids
    saved = torch.load(tmp_path / "ev" / "per_query.pt", weights_only=True)["ext"]
    assert saved["keys"] == ids and saved["t2i_R@5"].shape == (len(txt),)


def _write(path: Path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_precomputed_errors_name_the_file_and_column(tmp_path):
    img, txt, owner = _random_set(n_img=6, per=1, d=4)
    good_i = _write(tmp_path / "i.parquet", id=[str(i) for i in range(6)], embedding=[list(r) for r in img])
    good_t = _write(tmp_path / "t.parquet", image_id=[str(i) for i in range(6)], embedding=[list(r) for r in txt])

    bad = _write(tmp_path / "nocol.parquet", id=["0"], vec=[[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"nocol\.parquet.*no column 'embedding'"):
        evaluate_embeddings(bad, good_t)
    ragged = _write(tmp_path / "ragged.parquet", embedding=[[1.0, 2.0, 3.0, 4.0]] * 3 + [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"ragged\.parquet.*'embedding' row 3 has 2 values"):
        evaluate_embeddings(good_i, ragged)
    strings = _write(tmp_path / "str.parquet", embedding=["a", "b"])
    with pytest.raises(ValueError, match=r"str\.parquet.*column 'embedding' has type string"):
        evaluate_embeddings(strings, good_t)
    unknown = _write(tmp_path / "unk.parquet", image_id=["0", "nope"], embedding=[list(txt[0]), list(txt[1])])
    with pytest.raises(ValueError, match=r"unk\.parquet.*column 'image_id'.*'nope'"):
        evaluate_embeddings(good_i, unknown)
    dup = _write(tmp_path / "dup.parquet", id=["0", "0"], embedding=[list(img[0]), list(img[1])])
    with pytest.raises(ValueError, match=r"dup\.parquet.*column 'id' has duplicate ids"):
        evaluate_embeddings(dup, good_t)
    nan = img.copy()
    nan[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match=r"nan\.npy.*row 4 holds NaN"):
        evaluate_embeddings(str(tmp_path / "nan.npy"), good_t)
    np.save(tmp_path / "flat.npy", img[0])
    with pytest.raises(ValueError, match=r"flat\.npy.*2-D"):
        evaluate_embeddings(str(tmp_path / "flat.npy"), good_t)
    np.save(tmp_path / "wide.npy", np.ones((6, 5), np.float32))
    with pytest.raises(ValueError, match=r"D=5.*t\.parquet.*D=4"):
        evaluate_embeddings(str(tmp_path / "wide.npy"), good_t)
    np.save(tmp_path / "t2i.npy", np.array([0, 1, 2, 3, 4, 9]))
    with pytest.raises(ValueError, match=r"t2i\.npy.*entry 5 = 9"):
        evaluate_embeddings(good_i, good_t, str(tmp_path / "t2i.npy"))
    np.save(tmp_path / "short.npy", np.array([0, 1]))
    with pytest.raises(ValueError, match=r"short\.npy.*expected 6 integer"):
        evaluate_embeddings(good_i, good_t, str(tmp_path / "short.npy"))
    np.save(tmp_path / "three.npy", img[:3])
    with pytest.raises(ValueError, match=r"three\.npy.*3 rows.*txt\.npy.*6.*text_to_image"):
        np.save(tmp_path / "txt.npy", txt)
        evaluate_embeddings(str(tmp_path / "three.npy"), str(tmp_path / "txt.npy"))
    with pytest.raises(FileNotFoundError, match=r"embeddings.images: no file at '.*missing\.npy'"):
        evaluate_embeddings(str(tmp_path / "missing.npy"), good_t)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"x\.csv.*use \.npy or \.parquet"):
        evaluate_embeddings(str(tmp_path / "x.csv"), good_t)


def test_config_errors_name_what_to_set(tmp_path, trained):
    with pytest.raises(ValueError, match="set load="):
        run(eval_cfg(tmp_path / "e1", f"sets={trained['shards']}"))
    with pytest.raises(ValueError, match="at least one evaluation set"):
        run(eval_cfg(tmp_path / "e2", f"load={trained['run']}"))
    with pytest.raises(ValueError, match=r"embeddings.texts=null: precomputed embeddings need both files"):
        run(eval_cfg(tmp_path / "e3", "embeddings.images=x.npy"))
    with pytest.raises(Exception, match=r"sets\.domain"):
        run(eval_cfg(tmp_path / "e4", f"load={trained['run']}", f"+sets.domain={tmp_path / 'nothing-here'}"))


def test_named_sets():
    assert named_sets(None) == {}
    assert named_sets("data/demo_data/") == {"demo_data": "data/demo_data/"}
    assert named_sets("shards/val-{000000..000003}.tar") == {"val": "shards/val-{000000..000003}.tar"}
    assert named_sets({"a": "x", "b": ["y", "z"]}) == {"a": "x", "b": ["y", "z"]}
    assert named_sets({"a": None, "b": "x"}) == {"b": "x"}  # null placeholders are skipped, as in training


def test_results_table_shows_chance():
    from rich.console import Console

    res = {"s": {"metrics": {"t2i_R@1": 0.5, "mean_R": 0.4}, "chance": {"t2i_R@1": 0.01},
                 "n_images": 100, "n_texts": 200}}
    console = Console(record=True, width=200)
    console.print(results_table(res))
    text = console.export_text()
    assert "0.500" in text and "chance" in text and "0.010" in text


# ------------------------------------------------------------------- a folder cliptune names itself, errors
def test_a_multirun_folder_is_accepted_as_printed(trained, tmp_path):
    """``runs/losses/loss=clip`` (a sweep's folder) as cliptune-eval's ``load=``, typed as the sweep printed it:
    the same numbers as the run's own folder."""
    import shutil
    import subprocess
    import sys

    from conftest import subprocess_env

    sweep_run = trained["root"] / "losses" / "loss=clip"
    if not sweep_run.exists():
        shutil.copytree(trained["run"], sweep_run)
    out = tmp_path / "ev"
    done = subprocess.run([sys.executable, "-m", "cliptune.eval.cli", f"load={sweep_run}", f"sets={trained['shards']}",
                           f"out={out}", "device=cpu", "workers=0"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads((out / "results.json").read_text())
    assert got["model"] == str(sweep_run)
    own = run(eval_cfg(tmp_path / "own", f"load={trained['run']}", f"sets={trained['shards']}"))
    assert got["sets"]["shards"]["metrics"] == own["shards"]["metrics"]


@pytest.mark.parametrize("given,read", [
    (["load=runs/losses/loss=clip"], ["load='runs/losses/loss=clip'"]),
    (["run=runs/x/loss=siglip,optim.lr=1e-4"], ["run='runs/x/loss=siglip,optim.lr=1e-4'"]),  # two swept keys
    (["+sets.a=s/loss=clip/val", "-m", "x=1,2"], ["+sets.a='s/loss=clip/val'", "-m", "x=1,2"]),
    (["name=it's=x"], ["name=\"it's=x\""]),
    # left to Hydra: already quoted, parses as typed, a flag's value, a list, an interpolation
    (["load='runs/a=b'", "loss=clip,siglip", "-sc", "install=bash", "data.train=[a=b]", "k=${a}=b"],
     ["load='runs/a=b'", "loss=clip,siglip", "-sc", "install=bash", "data.train=[a=b]", "k=${a}=b"]),
])
def test_values_holding_equals_are_quoted_for_hydra(given, read):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cliptune.cli import quote_equals

    assert quote_equals(given) == read
    if given[0].startswith(("load=runs/losses", "run=")):
        (parsed,) = OverridesParser.create().parse_overrides(read)
        assert parsed.value() == given[0].split("=", 1)[1]  # the path, unchanged


def test_only_cliptunes_own_errors_become_one_line(monkeypatch):
    from cliptune.cli import user_error
    from cliptune.rundir import RunDirBusyError
    from cliptune.validate import ConfigError

    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the error under test
            return e
        raise AssertionError("no error")

    monkeypatch.delenv("CLIPTUNE_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    here = raised(lambda: (_ for _ in ()).throw(ConfigError(["data.train: shard spec 'x' matches no shards"])))
    assert user_error(here) is None  # raised here, in a test: not cliptune's
    from cliptune.data.specs import resolve_sources
    from cliptune.validate import validate_paths

    many = raised(lambda: validate_paths(compose_train(["name=/abs", "data=wds", "data.train=no/such"]),
                                         lambda spec, splits, key: resolve_sources(spec, splits, what=key)))
    assert user_error(many).startswith("error: invalid config: 2 problems\n  - name='/abs'")

    e = raised(lambda: resolve_sources("no/such/shards", what="data.train"))
    assert user_error(e) == f"error: {e}" and "\n" not in user_error(e)
    assert user_error(raised(lambda: np.zeros(3).reshape(2))) is None  # a library's ValueError keeps its traceback
    monkeypatch.setenv("CLIPTUNE_TRACEBACK", "1")
    assert user_error(e) is None
    monkeypatch.setenv("CLIPTUNE_TRACEBACK", "0")
    assert user_error(e) is not None
    busy = RunDirBusyError("runs/x is in use by another run (PID 1)")
    assert user_error(busy) is None  # no traceback into cliptune: not raised by it
