"""Durable record of payments, attempts, operations and outbox events."""
