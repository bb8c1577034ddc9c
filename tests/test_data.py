"""Alpaca and chat data: exact templates, masking, EOS, validation errors, splits, batching, audit, downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llm_lightning.data import BUNDLED_SAMPLE, IGNORE_INDEX, AlpacaDataModule, DataError, encode_conversation, read_records
from llm_lightning.data.conversations import from_alpaca
from llm_lightning.data.batching import ShuffledBatchSampler, collate, evaluation_batches
from llm_lightning.prompts import get_template
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def Record(instruction: str, input: str, output: str):
    return from_alpaca({"instruction": instruction, "input": input, "output": output})


def encode_record(record, tokenizer, template_name: str, **options):
    return encode_conversation(record, tokenizer, get_template(template_name, tokenizer), **options)


def test_alpaca_templates_word_for_word(tokenizer):
    alpaca = get_template("alpaca", tokenizer)
    assert alpaca.format("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert alpaca.format("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
        "\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_prompt_is_masked_and_response_plus_eos_supervised(tokenizer):
    record = Record("What is 2 plus 3?", "", "2 plus 3 is 5.")
    example = encode_record(record, tokenizer, "alpaca", max_seq_length=256)
    prompt_ids = tokenizer.encode(get_template("alpaca", tokenizer).format("What is 2 plus 3?"), bos=True)
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    supervised = example.labels[len(prompt_ids):]
    assert supervised == example.input_ids[len(prompt_ids):]
    assert supervised[-1] == tokenizer.eos_id
    assert tokenizer.decode(supervised) == "2 plus 3 is 5."
    with_inputs = encode_record(record, tokenizer, "alpaca", max_seq_length=256, train_on_inputs=True)
    assert with_inputs.labels == with_inputs.input_ids


def test_truncation_keeps_eos_and_drops_prompts_that_do_not_fit(tokenizer):
    record = Record("Write a long story.", "", "Once upon a time " * 50)
    example = encode_record(record, tokenizer, "alpaca", max_seq_length=48)
    assert len(example.input_ids) == 48 and example.truncated
    assert example.input_ids[-1] == example.labels[-1] == tokenizer.eos_id
    assert encode_record(record, tokenizer, "alpaca", max_seq_length=10) is None


def test_padding_never_masks_a_real_eos(tokenizer):
    examples = [encode_record(Record("Say hi.", "", text), tokenizer, "alpaca", max_seq_length=64)
                for text in ("Hi.", "Hello there, how are you today?")]
    batch = collate(examples, pad_id=tokenizer.eos_id)  # the worst case: pad == eos
    short = examples[0]
    assert batch["input_ids"].shape[1] == len(examples[1].input_ids)
    assert batch["labels"][0, len(short.input_ids) - 1] == tokenizer.eos_id
    assert (batch["labels"][0, len(short.input_ids):] == IGNORE_INDEX).all()
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(e.supervised_tokens for e in examples)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("row, message", [
    ({"instruction": "a", "output": "b"}, "record 1 lacks field 'input'"),
    ({"instruction": "a", "input": 3, "output": "b"}, "record 1 field 'input' is a int, expected a string"),
    (["a", "b", "c"], "record 1 is a list, expected an object"),
])
def test_invalid_records_name_index_and_field(tmp_path, row, message):
    path = write_json(tmp_path / "d.json", [{"instruction": "a", "input": "", "output": "b"}, row])
    with pytest.raises(DataError, match=message):
        read_records(path)
    records, skipped = read_records(path, skip_invalid=True)
    assert (len(records), skipped) == (1, 1)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a",\n   "input": "" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 3, column 16"):
        read_records(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: invalid JSON on line 2"):
        read_records(jsonl)


def test_jsonl_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"i{i}", "input": "", "output": "o"}) for i in range(3)))
    assert [r.title for r in read_records(path)[0]] == ["i0", "i1", "i2"]
    with pytest.raises(DataError, match="nope.json: data file not found"):
        read_records(tmp_path / "nope.json")


def test_empty_and_all_too_long_are_errors(tmp_path, tokenizer):
    empty = AlpacaDataModule(str(write_json(tmp_path / "e.json", [])), tokenizer=tokenizer)
    with pytest.raises(DataError, match="no valid records"):
        empty.setup()
    too_long = AlpacaDataModule(str(BUNDLED_SAMPLE), tokenizer=tokenizer, max_seq_length=16)
    with pytest.raises(DataError, match="every training example is longer than data.max_seq_length=16"):
        too_long.setup()


def test_split_is_seeded_and_limit_takes_the_first_records(tokenizer):
    def split(seed):
        module = AlpacaDataModule(tokenizer=tokenizer, val_size=0.2, limit=50, seed=seed)
        module.setup()
        return module

    a, b, c = split(1), split(1), split(2)
    assert (len(a.train_examples), len(a.val_examples)) == (40, 10)
    assert [e.input_ids for e in a.val_examples] == [e.input_ids for e in b.val_examples]
    assert [e.input_ids for e in a.val_examples] != [e.input_ids for e in c.val_examples]
    first_50 = {r.messages[0]["instruction"] for r in read_records(BUNDLED_SAMPLE)[0][:50]}
    decoded = tokenizer.decode(a.train_examples[0].input_ids)
    assert any(instruction in decoded for instruction in first_50)


def test_sampler_order_depends_on_seed_and_epoch_and_skips_consumed_batches():
    sampler = ShuffledBatchSampler(7, batch_size=2, shuffle=False)
    assert list(sampler) == [[0, 1], [2, 3], [4, 5], [6]]
    assert len(sampler) == 4
    sampler.skip_batches(3)
    assert list(sampler) == [[6]]
    shuffled = ShuffledBatchSampler(7, batch_size=2, seed=3)
    first = list(shuffled)
    shuffled.set_epoch(1)
    assert first != list(shuffled)
    shuffled.set_epoch(0)
    assert first == list(shuffled)


@pytest.mark.parametrize("lengths", [None, [5, 9, 2, 7, 7, 3, 8, 1, 4, 6, 2]])
def test_ranks_deal_out_the_batches_one_process_takes(lengths):
    """Step k of two ranks is the two batches of step k of one process accumulating two."""
    one = list(ShuffledBatchSampler(11, batch_size=2, seed=5, lengths=lengths))
    ranks = [list(ShuffledBatchSampler(11, batch_size=2, seed=5, lengths=lengths, rank=r, world_size=2))
             for r in (0, 1)]
    assert len(one) == 6 and [len(r) for r in ranks] == [3, 3]
    assert [batch for step in zip(*ranks) for batch in step] == one


def test_ranks_leave_out_the_batches_that_do_not_fill_a_step():
    one = list(ShuffledBatchSampler(9, batch_size=2, seed=5))  # 5 batches: 2 steps of two ranks, one left
    ranks = [list(ShuffledBatchSampler(9, batch_size=2, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert [batch for step in zip(*ranks) for batch in step] == one[:4]
    with pytest.raises(DataError, match="trained on 2 ranks, this one has 1"):
        ShuffledBatchSampler(9, batch_size=2).load_state_dict({"epoch": 0, "consumed_batches": 1, "world_size": 2})


@pytest.mark.parametrize("count, batch_size, world_size", [(21, 4, 2), (13, 2, 2), (9, 4, 4), (5, 8, 2), (7, 3, 1)])
def test_evaluation_batches_split_the_set_evenly_over_ranks(count, batch_size, world_size):
    shares = [evaluation_batches(count, batch_size, r, world_size) for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1  # the same number of forwards on every rank
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(count))
    assert all(0 < len(batch) <= batch_size for share in shares for batch in share)


def test_a_set_too_small_to_split_is_evaluated_whole_on_every_rank():
    assert evaluation_batches(3, 1, 0, 2) == evaluation_batches(3, 1, 1, 2) == [[0], [1], [2]]


def test_sampler_state_resumes_at_the_first_unconsumed_batch_and_rolls_over_a_finished_epoch():
    uninterrupted = ShuffledBatchSampler(7, batch_size=2, seed=3)
    uninterrupted.set_epoch(1)
    epoch_one = list(uninterrupted)
    state = uninterrupted.state_dict(consumed_batches=2)
    assert state == {"epoch": 1, "consumed_batches": 2, "world_size": 1}
    resumed = ShuffledBatchSampler(7, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == epoch_one[2:]
    assert list(resumed) == epoch_one  # the skip applies to one iteration only
    resumed.load_state_dict({"epoch": 1, "consumed_batches": 4})
    uninterrupted.set_epoch(2)
    assert resumed.epoch == 2 and list(resumed) == list(uninterrupted)


def test_every_epoch_of_a_lightning_run_has_its_own_order():
    """Lightning sets the epoch of ``batch_sampler.sampler``, not of the batch sampler itself: the
    sampler must be reachable there, or every epoch repeats the first one's order."""
    import functools

    import lightning as L
    import torch

    from llm_lightning.loading import embedded_tokenizer
    from llm_lightning.lora import LoRAConfig
    from llm_lightning.module import LoRAFineTuner
    from tests.conftest import tiny_lora_model

    class FirstTokens(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.current_epoch, batch["input_ids"][:, 5:20].tolist()))

    record = FirstTokens()
    module = LoRAFineTuner(tiny_lora_model(vocab_size=49152), lora=LoRAConfig(r=4),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    datamodule = AlpacaDataModule(tokenizer=embedded_tokenizer(), limit=25, val_size=1, batch_size=4,
                                  max_seq_length=128)
    L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
              callbacks=[record]).fit(module, datamodule=datamodule)
    epochs = [[batch for epoch, batch in record.seen if epoch == e] for e in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == 6
    assert epochs[0] != epochs[1]
    assert sorted(row for batch in epochs[0] for row in batch) == sorted(row for batch in epochs[1] for row in batch)


def padded_tokens(batches, lengths) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_length_grouping_cuts_padding_and_keeps_every_example_once(tokenizer):
    module = AlpacaDataModule(tokenizer=tokenizer, max_seq_length=512, val_size=0)
    module.setup()
    lengths = [len(e.input_ids) for e in module.train_examples]
    plain = list(ShuffledBatchSampler(len(lengths), batch_size=4, seed=0))
    grouped_sampler = ShuffledBatchSampler(len(lengths), batch_size=4, seed=0, lengths=lengths)
    grouped = list(grouped_sampler)
    assert sorted(i for batch in grouped for i in batch) == list(range(len(lengths)))
    assert len(grouped) == len(grouped_sampler) == len(plain)
    # the bundled sample: padding falls from 21% of the real tokens to 1.5% (alpaca_en_demo: 72% to 1.8%)
    real = sum(lengths)
    assert padded_tokens(plain, lengths) > 1.15 * real
    assert padded_tokens(grouped, lengths) < 1.03 * real
    assert grouped == list(ShuffledBatchSampler(len(lengths), batch_size=4, seed=0, lengths=lengths))
    grouped_sampler.set_epoch(1)
    assert list(grouped_sampler) != grouped


def test_audit_reports_counts_and_the_supervision_boundary(tokenizer):
    module = AlpacaDataModule(tokenizer=tokenizer, max_seq_length=64, val_size=10)
    module.setup()
    report = module.report
    assert (report.train, report.val, report.records_read) == (len(module.train_examples), len(module.val_examples), 152)
    assert report.train + report.val + report.too_long == 152 and report.too_long > 0
    assert report.truncated == sum(e.truncated for e in module.train_examples + module.val_examples)
    assert 0 < report.masked_ratio < 1
    text = report.format()
    assert "### Response:\n    ▶" in text and text.rstrip().endswith("<|im_end|>◀")
    assert "p50" in text and "152 read" in text


def test_bundled_sample_is_varied_and_reproducible(tmp_path):
    records, skipped = read_records(BUNDLED_SAMPLE)
    assert len(records) >= 100 and skipped == 0
    assert 0.35 <= sum(1 for r in records if r.messages[0]["input"]) / len(records) <= 0.45
    assert len({r.title for r in records}) > 90
    before = BUNDLED_SAMPLE.read_bytes()
    subprocess.run([sys.executable, "scripts/write_alpaca_sample.py"], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1])
    assert BUNDLED_SAMPLE.read_bytes() == before


def test_url_source_is_downloaded_once_and_verified(tmp_path, tokenizer):
    source = shared_file("alpaca_en_demo.json")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    module = AlpacaDataModule(source.as_uri(), tokenizer=tokenizer, cache_dir=str(tmp_path), sha256=digest, limit=20)
    module.prepare_data()
    cached = [path for path in tmp_path.iterdir() if path.suffix != ".lock"]
    assert len(cached) == 1 and cached[0].read_bytes() == source.read_bytes()
    module.setup()
    assert module.report.records_read == 999 and len(module.train_examples) == 18
    bad = AlpacaDataModule(source.as_uri(), tokenizer=tokenizer, cache_dir=str(tmp_path / "other"), sha256="0" * 64)
    with pytest.raises(DataError, match="expected 0000"):
        bad.prepare_data()
    assert not [path for path in (tmp_path / "other").iterdir() if path.suffix != ".lock"]


def test_ranks_that_start_together_fetch_a_url_once(tmp_path):
    """Four processes ask for the same URL at once (as torchrun starts ranks): one request reaches
    the server, and every process gets the whole file."""
    body = json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(500)]).encode()
    requests = []

    class SlowServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            time.sleep(3.0)  # long enough for every process to be waiting
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alpaca.json"
    fetch = ("import sys; from pathlib import Path; from llm_lightning.data.records import download; "
             "print(len(download(sys.argv[1], Path(sys.argv[2])).read_bytes()))")
    try:
        local = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # never through a proxy
        ranks = [subprocess.Popen([sys.executable, "-c", fetch, url, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                  env=local) for _ in range(4)]
        sizes = [int(rank.communicate(timeout=120)[0]) for rank in ranks]
    finally:
        server.shutdown()
    assert requests == ["/alpaca.json"] and sizes == [len(body)] * 4


def test_real_alpaca_demo_file(tokenizer):
    module = AlpacaDataModule(str(shared_file("alpaca_en_demo.json")), tokenizer=tokenizer, max_seq_length=256)
    module.setup()
    assert module.report.records_read == 999 and module.report.kept == 999 - module.report.too_long
    assert module.report.truncated > 0
    assert all(e.input_ids[-1] == tokenizer.eos_id for e in module.train_examples)
