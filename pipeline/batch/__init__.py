"""The nightly job: manifests, the allowlist and object reads, the plan, Ray Data stages, output and commit."""
