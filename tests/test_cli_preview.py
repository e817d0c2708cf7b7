"""`kaiku preview` and the template checks of `kaiku check`, run through the CLI's entry point."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import pytest

from services.cli import PREVIEW_TOKEN, main

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "deploy/local/program.yaml"
PUBLIC_URL = "https://surveys.example.com"
LINK = f"{PUBLIC_URL}/s/{PREVIEW_TOKEN}"

SMS_PROGRAM = """\
version: 1
surveys:
  - id: delivery-csat
    metric: csat
    question:
      fi: {fi}
      sv: Hur nöjd var du med leveransen?
      en: How satisfied were you with the delivery?
    channels: [sms, email]
    reminder: {{after: 3d}}
"""


@pytest.fixture(autouse=True)
def _settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The settings the CLI reads from the environment: known values, nothing inherited."""
    for name in ("KAIKU_TEMPLATE_DIR", "KAIKU_SMS_MAX_SEGMENTS", "KAIKU_PROGRAM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAIKU_PUBLIC_URL", PUBLIC_URL)
    monkeypatch.chdir(tmp_path)


def kaiku(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    code = exit_info.value.code
    assert isinstance(code, int)
    return code


def preview(*argv: str) -> int:
    return kaiku("preview", *argv, "--program", str(PROGRAM))


def sms_program(tmp_path: Path, fi: str = "Kuinka tyytyväinen olit toimitukseen?") -> Path:
    path = tmp_path / "program.yaml"
    path.write_text(SMS_PROGRAM.format(fi=fi), encoding="utf-8")
    return path


def test_preview_email(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "previews/nps.html"
    assert (
        preview("relationship-nps", "--channel", "email", "--locale", "fi", "--out", str(out)) == 0
    )
    eml = out.with_suffix(".eml")
    assert capsys.readouterr().out.splitlines() == [str(out), str(eml)]
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert '<html lang="fi"' in html
    assert "Kuinka todennäköisesti suosittelisit meitä ystävällesi tai kollegallesi?" in html
    assert re.findall(r'href="([^"]+\?score=\d+)"', html) == [
        f"{LINK}?score={n}" for n in range(11)
    ]
    assert f"{PUBLIC_URL}/u/{PREVIEW_TOKEN}" in html
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "Suosittelisitko meitä?"
    assert message["List-Unsubscribe"].startswith(f"<{PUBLIC_URL}/u/{PREVIEW_TOKEN}>")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Content-Language"] == "fi"
    assert message["In-Reply-To"] is None
    html_part = message.get_body(("html",))
    assert html_part is not None
    assert html_part.get_content() == html


def test_preview_email_reminder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert preview("support-csat", "--channel", "email", "--locale", "sv", "--reminder") == 0
    out = tmp_path / "var/preview/support-csat.email.sv.reminder.html"
    assert (
        capsys.readouterr().out.splitlines()[0] == "var/preview/support-csat.email.sv.reminder.html"
    )
    html = out.read_text(encoding="utf-8")
    assert "En liten påminnelse" in html
    message = email.message_from_bytes(
        out.with_suffix(".eml").read_bytes(), policy=email.policy.default
    )
    assert message["Subject"] == "Påminnelse: Hur gick det?"
    assert message["Message-ID"].endswith(".r1@kaiku.local>")
    assert message["In-Reply-To"] == message["Message-ID"].replace(".r1@", "@")


@pytest.mark.parametrize(
    ("locale", "text"),
    [
        (
            "fi",
            f"Kuinka tyytyväinen olit saamaasi palveluun? Anna arviosi (1-5): {LINK} "
            "Vastaa STOP, jos et halua enää kyselyjä.",
        ),
        (
            "sv",
            f"Hur nöjd var du med den service du fick? Svara här (1-5): {LINK} "
            "Svara STOP om du inte vill få fler enkäter.",
        ),
        (
            "en",
            f"How satisfied were you with the support you received? Answer here (1-5): {LINK} "
            "Reply STOP to opt out.",
        ),
    ],
)
def test_preview_sms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], locale: str, text: str
) -> None:
    assert preview("support-csat", "--channel", "sms", "--locale", locale, "--out", ".") == 0
    out = tmp_path / f"support-csat.sms.{locale}.txt"
    captured = capsys.readouterr()
    assert captured.out == f"{out.name}\n"  # the path as given
    # The shipped program sends this survey by email only: a preview still shows the SMS.
    assert "does not list the sms channel" in captured.err
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == text
    segments = 1 if len(text) <= 160 else 2
    assert lines[2] == (
        f"GSM-7, {segments} segment{'s' if segments > 1 else ''} "
        f"({len(text)} characters; the limit is 2 segments)"
    )


def test_preview_sms_reminder_over_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAIKU_SMS_MAX_SEGMENTS", "1")
    code = preview("relationship-nps", "--channel", "sms", "--locale", "sv", "--reminder")
    assert code == 1
    out = tmp_path / "var/preview/relationship-nps.sms.sv.reminder.txt"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("Påminnelse: Hur troligt är det")
    assert "GSM-7, 2 segments" in text
    err = capsys.readouterr().err
    assert "survey 'relationship-nps', sms, sv: the SMS is 2 GSM-7 segments" in err
    assert "KAIKU_SMS_MAX_SEGMENTS" in err


def test_preview_uses_the_customer_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    templates = tmp_path / "templates"
    (templates / "sms/support-csat").mkdir(parents=True)
    (templates / "sms/support-csat/invitation.en.txt.j2").write_text(
        "ACME: {{ question }}\n{{ survey_url }}\n{{ t.sms_optout }}", encoding="utf-8"
    )
    monkeypatch.setenv("KAIKU_TEMPLATE_DIR", str(templates))
    assert preview("support-csat", "--channel", "sms", "--locale", "en", "--out", "a.txt") == 0
    assert (tmp_path / "a.txt").read_text(encoding="utf-8").splitlines()[0] == (
        f"ACME: How satisfied were you with the support you received? {LINK} Reply STOP to opt out."
    )
    # Other locales still get the shipped template.
    assert preview("support-csat", "--channel", "sms", "--locale", "fi", "--out", "b.txt") == 0
    assert "ACME" not in (tmp_path / "b.txt").read_text(encoding="utf-8")


def test_preview_refuses_an_unknown_survey(capsys: pytest.CaptureFixture[str]) -> None:
    assert preview("no-such-survey", "--channel", "email", "--locale", "en") == 1
    err = capsys.readouterr().err
    assert "no survey 'no-such-survey'" in err
    assert "relationship-nps, support-csat" in err


def test_preview_reports_a_broken_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "t/email").mkdir(parents=True)
    (tmp_path / "t/email/invitation.html.j2").write_text("<p>{{ brand.name }}</p>")
    monkeypatch.setenv("KAIKU_TEMPLATE_DIR", str(tmp_path / "t"))
    assert preview("support-csat", "--channel", "email", "--locale", "en") == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/t/email/invitation.html.j2:1: 'brand' is undefined" in err


def test_check_passes_the_shipped_program(capsys: pytest.CaptureFixture[str]) -> None:
    assert kaiku("check", str(PROGRAM)) == 0
    assert capsys.readouterr().out.startswith(f"{PROGRAM}: ok")


def test_check_passes_the_shipped_program_sent_by_sms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a plausible production address instead of the configured one.
    monkeypatch.delenv("KAIKU_PUBLIC_URL")
    program = tmp_path / "sms.yaml"
    text = PROGRAM.read_text(encoding="utf-8")
    program.write_text(text.replace("channels: [email]", "channels: [sms, email]"))
    assert "channels: [sms, email]" in program.read_text()
    assert kaiku("check", str(program)) == 0
    assert kaiku("check", str(sms_program(tmp_path))) == 0


def test_check_fails_an_sms_over_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAIKU_PUBLIC_URL")
    long = (
        "Kuinka tyytyväinen olit tilauksesi toimitukseen kokonaisuutena, kun otat huomioon "
        "toimitusajan, kuljettajan palvelun, pakkauksen kunnon, seurantaviestit ja sen, "
        "miten helposti sait tarvittaessa yhteyden asiakaspalveluumme?"
    )
    program = sms_program(tmp_path, fi=long)
    assert kaiku("check", str(program)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    # The Finnish invitation and its reminder; Swedish and English are short enough.
    assert [line.split(": the SMS is")[0] for line in lines] == [
        f"{program}: survey 'delivery-csat', sms, fi",
        f"{program}: survey 'delivery-csat', sms, fi, reminder",
    ]
    assert "is 3 GSM-7 segments, more than the limit of 2 (KAIKU_SMS_MAX_SEGMENTS)" in lines[0]
    assert "https://feedback.example-company.com/s/" in lines[0]
    # Allowed three segments, it passes.
    monkeypatch.setenv("KAIKU_SMS_MAX_SEGMENTS", "3")
    assert kaiku("check", str(program)) == 0


def test_check_fails_a_template_that_does_not_render(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    program = sms_program(tmp_path)
    templates = tmp_path / "templates"
    (templates / "sms").mkdir(parents=True)
    (templates / "sms/invitation.sv.txt.j2").write_text(
        "{{ question }}\n{{ survey_url }} {{ shop_name }}", encoding="utf-8"
    )
    monkeypatch.setenv("KAIKU_TEMPLATE_DIR", str(templates))
    assert kaiku("check", str(program), str(PROGRAM)) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"{program}: survey 'delivery-csat', sms, sv{reminder}: the template fails: "
        f"{templates}/sms/invitation.sv.txt.j2:2: 'shop_name' is undefined"
        for reminder in ("", ", reminder")
    ]
    # The shipped program does not send SMS: that template is not its problem.
    assert captured.out == f"{PROGRAM}: ok (2 surveys, 4 triggers)\n"
    # A syntax error names its file and line too.
    (templates / "email").mkdir()
    (templates / "email/invitation.txt.j2").write_text("{{ question }\n", encoding="utf-8")
    assert kaiku("check", str(PROGRAM)) == 1
    err = capsys.readouterr().err
    assert f"{templates}/email/invitation.txt.j2:1: unexpected '}}'" in err
