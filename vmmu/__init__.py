"""vmmu: an executable model of the Linux KVM x86 TDP MMU, served over gRPC."""
