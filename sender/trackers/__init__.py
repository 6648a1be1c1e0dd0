"""Dirty trackers for pre-copy rounds; see ``sender.trackers.base`` for the interface."""
