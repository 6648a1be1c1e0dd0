"""The sender agent: attaches to a process, finds its pages and streams them to a receiver."""
