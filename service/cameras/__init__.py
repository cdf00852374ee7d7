"""Cameras the server watches itself: ``urls`` (what may be opened, and redaction), ``store`` (the
persisted list), ``source`` (a reader thread per camera), ``manager`` (scoring, state, events)."""
