"""Hosted jobs end to end: the real `openai` and `google-genai` SDKs against a local fake of both APIs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltatune import hosted
from deltatune.cli import main
from deltatune.errors import DataError
from deltatune.hosted import tokens
from tests.fake_providers import FakeProviders

ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]}
HOSTED_COMMANDS = ["prepare", "estimate", "submit", "status", "events", "list", "cancel", "wait"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProviders]:
    """The fake server, OPENAI_API_KEY set to its key, Google credentials that carry its token."""
    import google.auth
    from google.oauth2.credentials import Credentials

    monkeypatch.setattr(tokens, "_load_tiktoken", lambda model: (_ for _ in ()).throw(ConnectionError()))
    monkeypatch.setattr(tokens, "_ENCODINGS", {})
    with FakeProviders() as server:
        monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.storage_url)
        monkeypatch.setattr(google.auth, "default",
                            lambda *a, **k: (Credentials(token=server.google_token), "proj"))
        yield server


@pytest.fixture
def data(tmp_path: Path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(20)), encoding="utf-8")
    return str(path)


def openai_opts(fake: FakeProviders) -> dict:
    return {"base_url": fake.openai_url}


def vertex_opts(fake: FakeProviders) -> dict:
    return {"base_url": fake.vertex_url, "project": "proj", "location": "us-central1", "staging": "gs://bkt/tune",
            "retry_delay": 0.01}


def test_openai_submit_status_events_wait(fake: FakeProviders, data: str) -> None:
    job = hosted.submit(data, "openai", "gpt-4o-mini-2024-07-18", epochs=2, suffix="dates", **openai_opts(fake))
    upload = json.loads(fake.uploads[0]["content"].splitlines()[0])
    assert upload == ROW
    created = fake.jobs[job.id].body
    assert created["hyperparameters"]["n_epochs"] == 2 and created["method"]["type"] == "supervised"
    assert job.status().status == "queued"  # validating_files maps to queued
    updates: list[hosted.JobInfo] = []
    final = job.wait(poll_interval=0.001, on_update=updates.append)
    assert final.status == "succeeded" and final.fine_tuned_model.startswith("ft:gpt-4o-mini")
    assert [u.status for u in updates][-2:] == ["running", "succeeded"]
    assert final.step == 3 and final.loss == pytest.approx(1 / 3)
    messages = [e.message for e in job.events()]
    assert messages[0].startswith("Created") and "successfully completed" in messages[-1]
    assert job.backend.checkpoints(job.id)[0]["step"] == 3
    assert [j.id for j in hosted.list_jobs("openai", **openai_opts(fake))] == [job.id]


def test_openai_failed_and_cancelled(fake: FakeProviders, data: str) -> None:
    failing = hosted.submit(data, "openai", "gpt-fail-model", **openai_opts(fake))
    info = failing.wait(poll_interval=0.001)
    assert info.status == "failed" and "invalid training file" in info.error
    job = hosted.submit(data, "openai", "gpt-4o-mini", **openai_opts(fake))
    assert job.cancel().status == "cancelled"
    assert job.wait(poll_interval=0.001).status == "cancelled"


def test_vertex_submit_wait_list_cancel(fake: FakeProviders, data: str) -> None:
    job = hosted.submit(data, "vertex", "gemini-2.5-flash", epochs=3, suffix="dates", validation=None,
                        **vertex_opts(fake))
    assert job.id.startswith("projects/proj/locations/us-central1/tuningJobs/")
    upload = fake.uploads[0]
    assert upload["uri"].startswith("gs://bkt/tune/train.vertex-") and upload["uri"].endswith(".jsonl")
    assert json.loads(upload["content"].splitlines()[0])["contents"][1]["role"] == "model"
    spec = fake.jobs[job.id].body["supervisedTuningSpec"]
    assert spec["hyperParameters"]["epochCount"] == 3 and spec["trainingDatasetUri"] == upload["uri"]
    final = job.wait(poll_interval=0.001)
    assert final.status == "succeeded" and final.raw_status == "JOB_STATE_SUCCEEDED"
    assert final.fine_tuned_model.endswith("/endpoints/88")
    assert [e.message for e in job.events()][-1].startswith("job succeeded")
    assert hosted.list_jobs("vertex", **vertex_opts(fake))[0].id == job.id
    other = hosted.submit(data, "vertex", "gemini-2.5-flash", **vertex_opts(fake))
    assert other.cancel().status == "cancelled"
    failed = hosted.submit(data, "vertex", "gemini-fail", **vertex_opts(fake)).wait(poll_interval=0.001)
    assert failed.status == "failed" and "Dataset validation failed" in failed.error


def test_malformed_file_rejected_before_upload(fake: FakeProviders, data: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(data).read_text() + '{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:21: no assistant message"):
        hosted.submit(str(bad), "openai", "gpt-4o-mini", **openai_opts(fake))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(Path(data).read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:21: not valid JSON"):
        hosted.submit(str(broken), "vertex", "gemini-2.5-flash", **vertex_opts(fake))
    assert fake.requests == [] and fake.uploads == []


def test_401_is_clear_and_never_shows_the_key(fake: FakeProviders, data: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "sk-wrong-key-do-not-print-123456"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    code = main(["hosted", "submit", data, "--provider", "openai", "--model", "gpt-4o-mini",
                 "--base-url", fake.openai_url])
    out, err = capsys.readouterr()
    assert code == 2 and "authentication failed (HTTP 401)" in err and "OPENAI_API_KEY" in err
    assert wrong not in out + err and "Traceback" not in err
    with pytest.raises(hosted.HostedError, match="HTTP 401"):
        hosted.job("projects/proj/locations/us-central1/tuningJobs/1", credentials=_bad_google_credentials(),
                   base_url=fake.vertex_url, project="proj", location="us-central1").status()


def _bad_google_credentials():
    from google.oauth2.credentials import Credentials

    return Credentials(token="ya29.wrong")


def test_429_retried_then_succeeds_and_5xx_reported(fake: FakeProviders, data: str) -> None:
    fake.fail(429, times=2)
    job = hosted.submit(data, "openai", "gpt-4o-mini", **openai_opts(fake))
    assert job.status().status == "queued"
    fake.fail(500, times=10)
    with pytest.raises(hosted.HostedError, match=r"server error \(HTTP 500\)"):
        job.status()
    fake._failures.clear()
    fake.fail(429, times=2)
    vjob = hosted.submit(data, "vertex", "gemini-2.5-flash", **vertex_opts(fake))  # GCS upload retried
    fake.fail(429, times=1)
    assert vjob.status().status in ("queued", "running")  # SDK retried
    fake.fail(503, times=10)
    with pytest.raises(hosted.HostedError, match="HTTP 503"):
        vjob.status()


def test_cli_flow_openai(fake: FakeProviders, data: str, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prepared.jsonl"
    assert main(["hosted", "prepare", data, "--provider", "openai", "-o", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0]) == ROW
    assert main(["hosted", "estimate", data, "--provider", "openai", "--model", "gpt-4o-mini",
                 "--price-per-1m", "3"]) == 0
    assert "billed tokens" in capsys.readouterr().out
    url = ["--base-url", fake.openai_url]
    assert main(["hosted", "submit", data, "--provider", "openai", "--model", "gpt-4o-mini", *url]) == 0
    captured = capsys.readouterr()
    job_id = captured.out.strip()
    assert "2027-01-06" in captured.err and job_id.startswith("ftjob-")
    assert "warning: only 20 training examples; openai recommends at least 50" in captured.err
    assert main(["hosted", "status", job_id, *url]) == 0
    assert main(["hosted", "wait", job_id, "--poll", "0.001", *url]) == 0
    captured = capsys.readouterr()
    assert "succeeded: ft:gpt-4o-mini" in captured.out and "step 3/3" in captured.out
    assert main(["hosted", "events", job_id, *url]) == 0
    assert "successfully completed" in capsys.readouterr().out
    assert main(["hosted", "list", *url]) == 0 and job_id in capsys.readouterr().out
    main(["hosted", "submit", data, "--provider", "openai", "--model", "gpt-fail", *url])
    failing = capsys.readouterr().out.strip()
    assert main(["hosted", "wait", failing, "--poll", "0.001", *url]) == 1
    assert "failed: invalid_training_file: The job failed" in capsys.readouterr().err
    main(["hosted", "submit", data, "--provider", "openai", "--model", "gpt-4o-mini", *url])
    other = capsys.readouterr().out.strip()
    assert main(["hosted", "cancel", other, *url]) == 0 and "cancelled" in capsys.readouterr().out
    assert main(["hosted", "wait", other, "--poll", "0.001", *url]) == 1


def test_cli_flow_vertex_and_bad_data(fake: FakeProviders, data: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--base-url", fake.vertex_url, "--project", "proj", "--location", "us-central1"]
    many = tmp_path / "many.jsonl"
    many.write_text(Path(data).read_text() * 2)
    assert main(["hosted", "submit", str(many), "--provider", "vertex", "--model", "gemini-2.5-flash",
                 "--staging", "gs://bkt/x", *common]) == 0
    captured = capsys.readouterr()
    name = captured.out.strip()
    assert name.startswith("projects/proj/") and "2027-01-06" not in captured.err
    assert main(["hosted", "wait", name, "--poll", "0.001", *common]) == 0
    assert main(["hosted", "submit", str(many), "--provider", "vertex", "--model", "gemini-2.5-flash",
                 *common]) == 2
    assert "--staging gs://BUCKET/PREFIX" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}\n')
    assert main(["hosted", "prepare", str(bad), "--provider", "openai", "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: messages[0]: field 'content' is empty" in err and "requires at least 10" in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("command", HOSTED_COMMANDS)
def test_hosted_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["hosted", command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"usage: deltatune hosted {command}" in out
    assert "2027-01-06" in out


PAIR = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello"}, "rejected": {"from": "gpt", "value": "Go away"}}


@pytest.fixture
def pairs(tmp_path: Path) -> str:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR] * 20), encoding="utf-8")
    return str(path)


def test_preference_data_starts_an_openai_dpo_job(fake: FakeProviders, pairs: str) -> None:
    job = hosted.submit(pairs, "openai", "gpt-4.1-mini-2025-04-14", epochs=2, beta=0.2, **openai_opts(fake))
    row = json.loads(fake.uploads[0]["content"].splitlines()[0])
    assert row == {"input": {"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}]},
                   "preferred_output": [{"role": "assistant", "content": "Hello"}],
                   "non_preferred_output": [{"role": "assistant", "content": "Go away"}]}
    method = fake.jobs[job.id].body["method"]
    assert method == {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.2}}}


def test_preference_data_starts_a_vertex_preference_tuning_job(fake: FakeProviders, pairs: str) -> None:
    job = hosted.submit(pairs, "vertex", "gemini-2.5-flash", beta=0.1, **vertex_opts(fake))
    row = json.loads(fake.uploads[0]["content"].splitlines()[0])
    assert row["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert row["contents"] == [{"role": "user", "parts": [{"text": "Hi"}]}]
    assert row["completions"] == [{"score": 1, "completion": {"role": "model", "parts": [{"text": "Hello"}]}},
                                  {"score": 0, "completion": {"role": "model", "parts": [{"text": "Go away"}]}}]
    spec = fake.jobs[job.id].body["preferenceOptimizationSpec"]
    assert spec["trainingDatasetUri"] == fake.uploads[0]["uri"] and spec["hyperParameters"]["beta"] == 0.1
    assert "supervisedTuningSpec" not in fake.jobs[job.id].body


def test_preference_data_is_checked_as_the_providers_check_it(fake: FakeProviders, tmp_path: Path, data: str) -> None:
    weighted = dict(PAIR, conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes?",
                                                                            "weight": 1},
                                         {"from": "human", "value": "Again"}])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([PAIR] * 12 + [weighted]))
    report = hosted.check(str(path), "openai")
    assert report.errors == [f"{path}:[12]: per-turn weights are not allowed in preference data; remove them"]
    few = tmp_path / "few.json"
    few.write_text(json.dumps([PAIR] * 5))
    assert hosted.check(str(few), "vertex").errors == ["5 training examples; vertex requires at least 16"]
    with pytest.raises(DataError, match="beta applies to preference data"):
        hosted.submit(data, "openai", "gpt-4o-mini", beta=0.1, **openai_opts(fake))
