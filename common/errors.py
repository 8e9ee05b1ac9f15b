"""The one base class of user errors: a mistake the user can mend, told in one line.

Every error that a wrong input, config, file or folder raises (a bad key, a damaged shard,
an unknown fidelity, a foreign release) derives from :class:`UserError`; its message
names the file, record, key or value at fault and what to do. The command line
(``launch/cli.py``) prints such an error as one line and exits with status 2, never with
a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

#: the exit status of a user error
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can mend; the message says where and what to do."""
