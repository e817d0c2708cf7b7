"""The program loader reports every error with its line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import main
from services.common.program import ProgramError, parse_program

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "deploy/local/program.yaml").read_text()


def errors(text: str) -> list[str]:
    with pytest.raises(ProgramError) as info:
        parse_program(text, "p.yaml")
    return info.value.errors


def test_the_shipped_program_is_valid() -> None:
    program = parse_program(GOOD)
    assert {s.id for s in program.surveys} == {"relationship-nps", "support-csat"}
    assert program.triggers_for("order.delivered")[0].survey == "relationship-nps"
    for survey in program.surveys:
        assert set(survey.question) == {"fi", "sv", "en"}


def test_unknown_survey_in_a_trigger_names_its_line() -> None:
    text = GOOD.replace("survey: support-csat", "survey: no-such-survey")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "no-such-survey" in ln)
    assert errors(text) == [f"p.yaml:{line}:13: triggers.1.survey: unknown survey 'no-such-survey'"]


def test_bad_metric_and_bad_yaml() -> None:
    assert errors(GOOD.replace("metric: nps", "metric: nsp"))[0].startswith(
        "p.yaml:10:13: surveys.0.metric:"
    )
    assert errors("surveys: [\n")[0].startswith("p.yaml:2:1: invalid YAML")


def test_unknown_locale_is_refused() -> None:
    text = GOOD.replace("      en: How likely", "      de: Wie wahrscheinlich")
    assert "unknown locale 'de'" in errors(text)[0]


def test_kaiku_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("event: ticket.solved\n", "event: ticket.solved\n    dealy: 1h\n"))
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(bad)])
    assert exit_info.value.code == 1
    assert "triggers.1.dealy: Extra inputs are not permitted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(ROOT / "deploy/local/program.yaml")])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("service", ["trigger", "dispatcher", "collector"])
def test_services_refuse_to_start_on_an_invalid_program(service: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("survey: support-csat", "survey: no-such-survey"))
    env = {**os.environ, "KAIKU_PROGRAM": str(bad)}
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown survey 'no-such-survey'" in done.stderr
    assert f"{bad}:" in done.stderr
