"""Dataset loaders and schema checks (sawyer.data): literal records in tmp_path, then the real data/ files."""
import json

import pytest

from sawyer import DATA_DIR
from sawyer.data import (ComparisonPair, MCQuestion, SchemaError, extract_instruction, filter_by_chars,
                         load_comparisons, load_conversations, load_dolly_prompts, load_mmlu, load_news,
                         load_truthful_qa_mc1, read_records, source_name, split, split_by_group)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nName three primary colours.\n\n### Response:")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise the text."
              "\n\n### Input:\nThe cat sat on the mat.\n\n### Response:")


# --------------------------------------------------------------------------- reading and schema errors
def test_read_records_folder_and_file(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    records = read_records(tmp_path / "ds")
    assert records == [{"text": "a"}, {"text": "b"}]
    assert records.source_name.endswith("ds/train.jsonl")
    assert read_records(tmp_path / "ds" / "train.jsonl") == records
    write_jsonl(tmp_path / "ds" / "cfg" / "test.jsonl", [{"x": 1}])
    assert read_records(tmp_path / "ds", split="test", config="cfg") == [{"x": 1}]


def test_missing_field_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "news" / "train.jsonl", [{"text": "one"}, {"text": "two"}, {"body": "three"}])
    with pytest.raises(SchemaError) as err:
        load_news(tmp_path / "news")
    msg = str(err.value)
    assert str(path) in msg and "row 3" in msg and "'text'" in msg and "missing" in msg


def test_null_field_message(tmp_path):
    write_jsonl(tmp_path / "news" / "train.jsonl", [{"text": "one"}, {"text": None}])
    with pytest.raises(SchemaError, match=r"train\.jsonl row 2: field 'text' must be a non-empty string, got None"):
        load_news(tmp_path / "news")


def test_row_numbers_are_file_lines(tmp_path):
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "a"}\n\n{"text": ""}\n', encoding="utf-8")  # a blank line 2; bad line 3
    with pytest.raises(SchemaError, match="row 3: field 'text'"):
        load_news(tmp_path / "d")
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(SchemaError, match="row 2: not valid JSON"):
        read_records(path)


def test_jsonl_rows_split_on_newline_only(tmp_path):
    """U+2028, U+0085 and a form feed are legal unescaped inside JSON strings; splitlines() would cut there."""
    texts = ["line\u2028separator", "next\x85line", "form\x0cfeed"]
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not escaped
    records = read_records(path)
    assert [r["text"] for r in records] == texts and records.line_numbers == [1, 2, 3]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "caf\xc3\xa9"}\n')
    assert load_news(path) == ["caf\u00e9"]
    js = tmp_path / "c.json"
    js.write_bytes(b"\xef\xbb\xbf" + b'[{"a": 1}]')
    assert read_records(js) == [{"a": 1}]


def test_non_utf8_byte_names_file_row_and_byte(tmp_path):
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    latin1 = '{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1")  # the 0xe9 byte sits at offset 28
    path.write_bytes(latin1)
    assert latin1.index(b"\xe9") == 28
    with pytest.raises(SchemaError, match=r"train\.jsonl row 2 \(byte 28\): not UTF-8 \(invalid continuation byte"):
        read_records(path)
    path.write_bytes(b"\xef\xbb\xbf" + latin1)  # offsets count the BOM: the byte as an editor shows it
    with pytest.raises(SchemaError, match=r"row 2 \(byte 31\)"):
        read_records(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_jsonl_is_refused_by_name(tmp_path, content):
    path = tmp_path / "dolly" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(SchemaError, match=r"dolly/train\.jsonl: holds no records"):
        load_dolly_prompts(tmp_path / "dolly")


def test_empty_json_list_is_refused_by_name(tmp_path):
    path = tmp_path / "cmp.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(SchemaError, match=r"cmp\.json: holds no records"):
        load_comparisons(str(path))


def test_a_line_of_unicode_whitespace_is_not_blank(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\u2028\n', encoding="utf-8")
    with pytest.raises(SchemaError, match="row 2: not valid JSON"):
        read_records(path)


def test_schema_error_is_a_value_error():
    assert issubclass(SchemaError, ValueError)


def test_missing_local_data_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="data/no-such-dataset"):
        read_records("data/no-such-dataset")


def test_source_name():
    assert source_name("data/news-summary", split="test") == "data/news-summary/test.jsonl"
    assert source_name("truthful_qa", split="validation", config="multiple_choice") == \
        "truthful_qa[multiple_choice/validation]"


def test_filter_by_chars():
    assert filter_by_chars(["a" * 5, "b" * 10, "c" * 20], 5, 10) == ["a" * 5, "b" * 10]


# --------------------------------------------------------------------------- conversations
def test_load_conversations_literal(tmp_path):
    write_jsonl(tmp_path / "oa" / "train.jsonl", [
        {"text": "### Human: hi### Assistant: sup"},
        {"text": "### Human: a### Assistant: b### Human: c"},   # ends on a human turn: trimmed
        {"text": "### Human: only a question"},                   # no bot turn: dropped
    ])
    write_jsonl(tmp_path / "gu" / "train.jsonl", [
        {"text": "### Human: ignored### Assistant: ignored", "prompt": "p", "response": "r"},
    ])
    convs, stats = load_conversations([tmp_path / "oa", tmp_path / "gu"])
    assert convs == [[("human", "hi"), ("bot", "sup")], [("human", "a"), ("bot", "b")], [("human", "p"), ("bot", "r")]]
    assert list(stats.values()) == [{"rows": 3, "trimmed": 1, "dropped": 1}, {"rows": 1, "trimmed": 0, "dropped": 0}]
    convs, stats = load_conversations(tmp_path / "oa", max_rows=1)
    assert len(convs) == 1 and list(stats.values()) == [{"rows": 1, "trimmed": 0, "dropped": 0}]


def test_load_conversations_bad_text(tmp_path):
    write_jsonl(tmp_path / "oa" / "train.jsonl", [{"text": "### Human: hi### Assistant: sup"}, {"text": "no markers"}])
    with pytest.raises(SchemaError, match="row 2: field 'text' is not a guanaco conversation"):
        load_conversations(tmp_path / "oa")


# --------------------------------------------------------------------------- comparisons
def test_extract_instruction_both_forms():
    assert extract_instruction(NO_INPUT) == "Name three primary colours."
    assert extract_instruction(WITH_INPUT) == "Summarise the text.\n\nThe cat sat on the mat."
    with pytest.raises(ValueError, match="Instruction"):
        extract_instruction("What is 2+2?")


def test_pairs_from_a_literal_item(tmp_path):
    item = {"user_input": NO_INPUT, "responses_and_scores": [
        {"response": "A", "score": 9, "source": "gpt4"}, {"response": "B", "score": 5, "source": "x"},
        {"response": "C", "score": 5.0, "source": "y"}, {"response": "D", "score": 2, "source": "z"}]}
    path = tmp_path / "cmp.json"
    path.write_text(json.dumps([item, dict(item, user_input=WITH_INPUT)]), encoding="utf-8")
    pairs = load_comparisons(str(path), max_items=1)
    q = "Name three primary colours."
    assert pairs == [ComparisonPair(q, "A", "B", 4.0, 9.0, 5.0, item=0),  # 9 vs 5
                     ComparisonPair(q, "A", "C", 4.0, 9.0, 5.0, item=0),  # 9 vs 5.0
                     ComparisonPair(q, "A", "D", 7.0, 9.0, 2.0, item=0),  # 9 vs 2
                     ComparisonPair(q, "B", "D", 3.0, 5.0, 2.0, item=0),  # 5 vs 2 (B vs C tie: no pair)
                     ComparisonPair(q, "C", "D", 3.0, 5.0, 2.0, item=0)]
    pairs = load_comparisons(str(path))
    assert len(pairs) == 10 and {p.item for p in pairs} == {0, 1}


def test_comparison_schema_errors(tmp_path):
    path = tmp_path / "cmp.json"
    good = {"user_input": NO_INPUT,
            "responses_and_scores": [{"response": "A", "score": 9}, {"response": "B", "score": 1}]}
    path.write_text(json.dumps([good, dict(good, responses_and_scores=[{"response": "A", "score": "9"}])]))
    with pytest.raises(SchemaError, match=r"cmp\.json index 1: field 'responses_and_scores'\[0\]\['score'\]"):
        load_comparisons(str(path))
    path.write_text(json.dumps([good, dict(good, user_input="no marker here")]))
    with pytest.raises(SchemaError, match=r"index 1: field 'user_input'.*Instruction"):
        load_comparisons(str(path))


# --------------------------------------------------------------------------- dolly and benchmarks
def test_dolly_prompts_literal(tmp_path):
    write_jsonl(tmp_path / "dolly" / "train.jsonl", [
        {"instruction": "Say hi.", "context": "", "response": "hi", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "A long text.", "response": "Text.", "category": "summarization"},
        {"instruction": "Q3", "context": "", "response": "", "category": "open_qa"}])
    assert load_dolly_prompts(tmp_path / "dolly") == ["Say hi.", "Summarise.\n\nA long text.", "Q3"]
    a = load_dolly_prompts(tmp_path / "dolly", n=2, seed=1)
    assert len(a) == 2 and a == load_dolly_prompts(tmp_path / "dolly", n=2, seed=1)


def test_truthful_qa_mc1_answer_index(tmp_path):
    row = {"question": "Q?", "mc1_targets": {"choices": ["x", "y", "z"], "labels": [0, 0, 1]},
           "mc2_targets": {"choices": ["x"], "labels": [1]}}
    write_jsonl(tmp_path / "tqa" / "multiple_choice" / "validation.jsonl", [row])
    assert load_truthful_qa_mc1(tmp_path / "tqa") == [MCQuestion("Q?", ["x", "y", "z"], 2)]
    bad = dict(row, mc1_targets={"choices": ["x", "y"], "labels": [1, 1]})
    write_jsonl(tmp_path / "tqa" / "multiple_choice" / "validation.jsonl", [row, bad])
    with pytest.raises(SchemaError, match="row 2: field 'mc1_targets.labels' must hold exactly one 1"):
        load_truthful_qa_mc1(tmp_path / "tqa")


def test_mmlu_answer_out_of_range(tmp_path):
    write_jsonl(tmp_path / "mmlu" / "world_religions" / "test.jsonl",
                [{"question": "Q?", "subject": "world_religions", "choices": ["a", "b", "c", "d"], "answer": 4}])
    with pytest.raises(SchemaError, match="row 1: field 'answer' must index one of 4 choices, got 4"):
        load_mmlu(tmp_path / "mmlu")


# --------------------------------------------------------------------------- splits
def test_split_deterministic():
    items = list(range(20))
    train, ev = split(items, 0.2, seed=42)
    assert (train, ev) == split(items, 0.2, seed=42)
    assert len(ev) == 4 and sorted(train + ev) == items
    assert (train, ev) != split(items, 0.2, seed=7)
    assert items == list(range(20))  # the input is not shuffled in place
    with pytest.raises(ValueError):
        split(items, 1.0, seed=0)


def test_split_by_group_keeps_groups_together():
    pairs = [ComparisonPair("q", "a", "b", 1.0, 2.0, 1.0, item=i // 3) for i in range(30)]  # 10 items x 3 pairs
    train, ev = split_by_group(pairs, "item", 0.2, seed=42)
    assert len(ev) == 6 and len(train) == 24
    assert not {p.item for p in train} & {p.item for p in ev}
    assert (train, ev) == split_by_group(pairs, lambda p: p.item, 0.2, seed=42)
    assert {p.item for p in ev} != {p.item for p in split_by_group(pairs, "item", 0.2, seed=3)[1]}


# --------------------------------------------------------------------------- the real data/ files
needs_data = pytest.mark.skipif(not (DATA_DIR / "news-summary" / "train.jsonl").exists(), reason="data/ not written")


@needs_data
def test_real_news():
    texts = load_news("data/news-summary")
    assert len(texts) > 0 and all(isinstance(t, str) and t for t in texts)
    assert len(load_news("data/news-summary", "test", n=5)) == 5
    assert 0 < len(filter_by_chars(texts, 200, 450)) < len(texts)


@needs_data
def test_real_conversations():
    convs, stats = load_conversations(["data/openassistant-guanaco", "data/guanaco"])
    assert len(convs) > 0 and all(c[-1][0] == "bot" for c in convs)
    oa = stats["data/openassistant-guanaco/train.jsonl"]
    assert oa["rows"] > 0 and oa["trimmed"] > 0  # the sample has rows ending on a human turn
    assert len(convs) == sum(s["rows"] - s["dropped"] for s in stats.values())


@needs_data
def test_real_comparisons():
    pairs = load_comparisons("data/gpt4-llm-comparison/comparison_data_v2.json")
    assert len(pairs) > 0
    assert all(p.score_diff > 0 and p.better_score - p.worse_score == p.score_diff for p in pairs)
    assert all(isinstance(p.question, str) and "###" not in p.question for p in pairs)
    train, ev = split_by_group(pairs, "item", 0.2, seed=42)
    assert train and ev and not {p.item for p in train} & {p.item for p in ev}


@needs_data
def test_real_dolly_and_benchmarks():
    prompts = load_dolly_prompts("data/databricks-dolly-15k")
    assert len(prompts) > 0 and all(isinstance(p, str) and p for p in prompts)
    sample = load_dolly_prompts("data/databricks-dolly-15k", n=10)
    assert len(sample) == 10 and sample == load_dolly_prompts("data/databricks-dolly-15k", n=10)
    tqa = load_truthful_qa_mc1("data/truthful_qa")
    assert len(tqa) > 0 and all(0 <= q.answer < len(q.choices) for q in tqa)
    mmlu = load_mmlu("data/mmlu")
    assert len(mmlu) > 0 and all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in mmlu)


def test_hub_branch_reads_through_datasets(tmp_path, monkeypatch):
    """The t4/a100 path (``datasets.load_dataset``) offline: a local folder passed through as if a hub id."""
    import datasets

    import sawyer.data

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(sawyer.data, "_local_path", lambda source: None)
    folder = str(tmp_path / "hub")
    write_jsonl(tmp_path / "hub" / "train.jsonl", [{"text": "a"}, {"text": ""}])
    records = read_records(folder)
    assert records == [{"text": "a"}, {"text": ""}] and records.source_name == f"{folder}[train]"
    with pytest.raises(SchemaError, match=r"\[train\] index 1: field 'text' must be a non-empty string, got ''"):
        load_news(folder)


def test_an_unpinned_hub_dataset_is_read_at_the_commit_looked_up_and_says_how_to_pin_it(monkeypatch, caplog):
    """Two datasets of the t4 preset have no known commit (presets.UNPINNED): online, the loader asks the hub for
    main's commit, reads exactly that commit, and logs the pin to add; a pinned id is passed through unasked."""
    import datasets
    import huggingface_hub

    import sawyer.data

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sawyer.data, "_local_path", lambda source: None)
    asked, loaded = [], []
    sha = "0123456789abcdef0123456789abcdef01234567"

    def dataset_info(self, repo):
        asked.append(repo)
        return type("Info", (), {"sha": sha})()

    def load_dataset(repo, config, split, revision):
        loaded.append((repo, revision))
        return datasets.Dataset.from_list([{"text": "news"}])

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with caplog.at_level("WARNING", logger="sawyer.data"):
        assert load_news("argilla/news-summary") == ["news"]
    assert asked == ["argilla/news-summary"] and loaded == [("argilla/news-summary", sha)]
    assert f"'argilla/news-summary@{sha}'" in caplog.text and "not pinned" in caplog.text
    load_news(f"org/pinned@{'f' * 40}")
    assert asked == ["argilla/news-summary"] and loaded[-1] == ("org/pinned", "f" * 40)

    def unreachable(self, repo):
        raise OSError("no route to the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sawyer.data"):
        load_news("guanaco/guanaco")
    assert loaded[-1] == ("guanaco/guanaco", None) and "could not be looked up (OSError: no route" in caplog.text


def test_truthful_qa_shuffle_moves_the_answer_off_position_zero():
    plain = load_truthful_qa_mc1("data/truthful_qa")
    shuffled = load_truthful_qa_mc1("data/truthful_qa", shuffle_seed=0)
    assert all(q.answer == 0 for q in plain)  # the dataset lists the true answer first
    assert len({q.answer for q in shuffled}) > 1
    for p, s in zip(plain, shuffled):
        assert sorted(p.choices) == sorted(s.choices) and s.choices[s.answer] == p.choices[p.answer]
    assert shuffled == load_truthful_qa_mc1("data/truthful_qa", shuffle_seed=0)
