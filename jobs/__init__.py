"""Entry points: the only things a user runs (`promptmill <command>`)."""


def error(e: Exception, code: int = 2) -> int:
    """One line on stderr, secrets redacted (messages can quote URLs and spec values); returns the exit code."""
    import sys

    from promptmill.pipelines.redaction import redact_text

    print(f"promptmill: error: {redact_text(str(e))}", file=sys.stderr)
    return code
