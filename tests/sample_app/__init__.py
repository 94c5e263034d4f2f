"""A user's project on pgdispatch, as the README's "Your own jobs" section shows it: a pipeline of
three queues (download → extract → notify), each stage enqueuing the next in its own transaction,
and a kind that fails until its third attempt."""
