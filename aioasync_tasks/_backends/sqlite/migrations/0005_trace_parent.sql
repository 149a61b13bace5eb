-- aioasync_tasks schema version 5 (sqlite): the trace context of the code that created a task.
-- aioasync_tasks.trace_parent: the W3C traceparent of the span current when the task was
-- created, when an observer that traces (aioasync_tasks.opentelemetry) was given to the
-- creating node; each attempt's span links to it (docs/reference.md, "Metrics and tracing").
-- NULL otherwise.

ALTER TABLE aioasync_tasks ADD COLUMN trace_parent VARCHAR(55);
