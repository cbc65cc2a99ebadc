"""Pivotal Token Search: the pure search over a scorer (`pivotal_tokens`), Monte-Carlo
success estimates (`estimates`), and verifiers (`verifiers`) with the sandbox that runs
code (`sandbox`)."""
