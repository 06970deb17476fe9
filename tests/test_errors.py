"""The reply classifier and the error types' invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import (
    Disposition,
    SmtpReplyError,
    Stage,
    classify_reply,
    parse_enhanced_code,
)

EXCHANGE_REPLIES = [
    (535, "5.7.3 Authentication unsuccessful [HOST]", Stage.AUTH, Disposition.HOLD),
    (
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
        "for the Tenant.",
        Stage.AUTH,
        Disposition.HOLD,
    ),
    (530, "5.7.57 Client not authenticated to send mail", Stage.MAIL, Disposition.HOLD),
    (
        550,
        "5.7.30 Basic authentication is not supported for Client Submission.",
        Stage.AUTH,
        Disposition.HOLD,
    ),
    (
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
        Stage.MAIL,
        Disposition.FAIL_MESSAGE,
    ),
    (
        554,
        "5.2.252 SendAsDenied; alerts@x not allowed to send as other@x",
        Stage.DATA,
        Disposition.FAIL_MESSAGE,
    ),
    (
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; x",
        Stage.DATA,
        Disposition.HOLD,
    ),
    (
        554,
        "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException",
        Stage.DATA,
        Disposition.HOLD,
    ),
    (
        432,
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        Stage.AUTH,
        Disposition.THROTTLE,
    ),
    (
        451,
        "4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77714)",
        Stage.MAIL,
        Disposition.THROTTLE,
    ),
    (
        421,
        "4.3.2 Service not available, closing transmission channel",
        Stage.MAIL,
        Disposition.DEFER,
    ),
    (452, "4.5.3 Too many recipients", Stage.RCPT, Disposition.DEFER),
    (
        550,
        "5.1.1 User unknown; RecipientNotFound; not found",
        Stage.RCPT,
        Disposition.FAIL_RECIPIENT,
    ),
    (
        550,
        "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
        Stage.MAIL,
        Disposition.HOLD,
    ),
    (
        550,
        "5.7.750 Service unavailable. Client blocked from sending from unregistered "
        "domains",
        Stage.MAIL,
        Disposition.HOLD,
    ),
]


@pytest.mark.parametrize(("code", "text", "stage", "expected"), EXCHANGE_REPLIES)
def test_errors_classify_reply_matches_exchange_reference(
    code: int, text: str, stage: Stage, expected: Disposition
) -> None:
    assert classify_reply(code, text, stage=stage) is expected


@given(
    code=st.integers(min_value=400, max_value=499),
    text=st.text(max_size=200),
    stage=st.sampled_from(list(Stage)),
)
def test_errors_classify_reply_never_fails_a_message_on_4xx(
    code: int, text: str, stage: Stage
) -> None:
    assert classify_reply(code, text, stage=stage) in (
        Disposition.DEFER,
        Disposition.THROTTLE,
    )


@given(text=st.text(max_size=200), stage=st.sampled_from(list(Stage)))
def test_errors_classify_reply_holds_every_535(text: str, stage: Stage) -> None:
    assert classify_reply(535, text, stage=stage) is Disposition.HOLD


@given(
    major=st.sampled_from("245"),
    subject=st.integers(0, 999),
    detail=st.integers(0, 999),
    rest=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=50),
)
def test_errors_parse_enhanced_code_reads_rfc3463_prefix(
    major: str, subject: int, detail: int, rest: str
) -> None:
    code = f"{major}.{subject}.{detail}"
    assert parse_enhanced_code(f"{code} {rest}") == code


@given(text=st.text(max_size=100))
def test_errors_parse_enhanced_code_never_raises(text: str) -> None:
    result = parse_enhanced_code(text)
    assert result is None or text.lstrip().startswith(result)


def test_errors_smtp_reply_error_message_has_code_and_enhanced_code() -> None:
    error = SmtpReplyError(535, "5.7.3 Authentication unsuccessful", stage=Stage.AUTH)
    assert (error.message, error.code) == (
        "535 5.7.3 Authentication unsuccessful",
        "535 5.7.3",
    )


def test_errors_smtp_reply_error_names_the_refused_recipient() -> None:
    error = SmtpReplyError(
        550, "5.1.1 RecipientNotFound", stage=Stage.RCPT, recipient="x@example.com"
    )
    assert error.message.endswith("(recipient x@example.com)")
