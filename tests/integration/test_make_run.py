"""`make run` as a new user meets it: start, paste the printed curl, open the link from the .eml
in var/outbox/, answer, see the score; Ctrl-C stops everything, the broker included."""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT
from tests.support import free_port


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_make_run_walkthrough(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIKU_")}
    env.update(KAIKU_PORT=str(port), KAIKU_PROGRAM=str(ROOT / "deploy/local/program.yaml"))
    # The walkthrough answers within a second of the email; a person takes longer than the
    # collector's 10 s "too fast to be a person" threshold.
    env.update(KAIKU_COLLECTOR_BOT_MIN_SECONDS="0")
    out = tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run"],
        cwd=tmp_path,
        env=env,
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: "Stop with Ctrl-C" in out.read_text() or proc.poll() is not None,
            60,
            "the banner",
        )
        banner = out.read_text()
        assert proc.poll() is None, banner
        # Paste the printed curl exactly as a user would.
        curl = re.search(r"^  (curl .*?)\n\n", banner, re.S | re.M)
        assert curl, banner
        posted = subprocess.run(
            ["bash", "-c", curl.group(1)], capture_output=True, text=True, timeout=30, check=True
        )
        assert '"accepted"' in posted.stdout, posted.stdout + posted.stderr

        outbox = tmp_path / "var" / "outbox"
        eml = wait_for(
            lambda: sorted(outbox.glob("*.eml")) if outbox.exists() else None,
            30,
            "an .eml file in var/outbox/",
        )[0]
        msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        text = msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
        link = re.search(rf"http://127\.0\.0\.1:{port}/s/[A-Za-z0-9_-]+", text)
        assert link, text

        token = re.search(r"API token \(generated; .*\): (\S+)", banner)
        assert token, banner
        auth = {"Authorization": f"Bearer {token.group(1)}"}
        with httpx.Client(timeout=10, follow_redirects=True) as http:
            page = wait_for(
                lambda: (r := http.get(link.group(0))).status_code == 200 and r,
                10,
                "the survey page",
            )
            assert 'lang="fi"' in page.text
            answered = http.post(link.group(0), data={"score": "10"})
            assert answered.status_code == 200  # after the redirect: the thank-you page
            score = http.get(
                f"http://127.0.0.1:{port}/v1/scores",
                params={"survey": "relationship-nps"},
                headers=auth,
            ).json()["rows"][0]
            assert (score["n"], score["value"]) == (1, 100.0)
            assert http.get(f"http://127.0.0.1:{port}/readyz").json()["ok"] is True
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert children, "the embedded broker is not a child of `kaiku run`"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    log = out.read_text()
    assert "trigger stopped" in log and "collector stopped" in log, log
    assert link.group(0).rsplit("/", 1)[1] not in log  # the link token is not in the logs
    after_banner = log.split("Stop with Ctrl-C", 1)[1]
    assert "aino@example.fi" not in after_banner  # no contact details in the log lines
    for pid in children:  # Ctrl-C stopped the broker too
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        ), f"process {pid} outlived `kaiku run`"
