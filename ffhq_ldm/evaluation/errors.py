"""Exception type for user-facing evaluation failures.

Library code raises :class:`EvaluationError` for anything the user can fix
(missing/empty folders, no Inception weights, fingerprint mismatch, ...).  The
CLI prints ``str(err)`` as a one-line message on stderr and exits with code 2.
"""


class EvaluationError(RuntimeError):
    """A clear, user-fixable problem with evaluation inputs or environment."""
