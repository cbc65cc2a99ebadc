"""Pivotal Token Search: the pure search over a scorer (`pivotal_tokens`) and Monte-Carlo
success estimates (`estimates`)."""
