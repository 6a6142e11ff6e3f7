//! weft's BPF dataplane.
//!
//! Entry points are thin; the work lives in small modules:
//! - [`parse`]: bounds-checked header access and header layouts,
//! - [`forward`]: the TC path for traffic leaving a pod or the node
//!   (same-node short-cut or VXLAN encapsulation, [`encap`]),
//! - [`decap`]: VXLAN arriving on the underlay, in XDP or (on underlays
//!   where that is faster) TC,
//! - [`flows`]: replies of flows the node's stack forwarded (NAT) go back
//!   through it,
//! - [`verdict`]: a handler's action or drop reason becomes the verdict;
//!   every drop is counted there,
//! - [`csum`]: IPv4 header checksums,
//! - [`maps`]: maps, per-CPU counters and load-time globals,
//! - [`zeroed`]: zero-filled stack buffers without a `memset` loop.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod csum;
mod decap;
mod encap;
mod flows;
mod forward;
mod maps;
mod parse;
mod verdict;
mod zeroed;

mod programs {
    use aya_ebpf::{
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    use crate::{decap, forward, verdict};

    /// XDP on the underlay interface: decapsulate VXLAN for this node.
    #[xdp]
    pub fn weft_xdp_decap(ctx: XdpContext) -> u32 {
        verdict::xdp(&ctx, decap::xdp(&ctx))
    }

    /// TC ingress on a pod's host-side veth: traffic from the pod.
    #[classifier]
    pub fn weft_from_pod(ctx: TcContext) -> i32 {
        verdict::tc(&ctx, forward::forward(&ctx, forward::Origin::Pod))
    }

    /// TC egress on a pod's host-side veth: what the node's stack delivers
    /// to the pod (the fast paths go around it). Notes the flow; never drops.
    #[classifier]
    pub fn weft_to_pod(ctx: TcContext) -> i32 {
        forward::note_stack_delivery(&ctx)
    }

    /// TC egress on `weft0`: traffic from the node itself to remote pods.
    #[classifier]
    pub fn weft_from_host(ctx: TcContext) -> i32 {
        verdict::tc(&ctx, forward::forward(&ctx, forward::Origin::Host))
    }

    /// TC ingress on the underlay: decapsulate VXLAN for this node (the
    /// `tc` decap mode, instead of XDP).
    #[classifier]
    pub fn weft_from_und(ctx: TcContext) -> i32 {
        verdict::tc(&ctx, decap::tc(&ctx))
    }

    #[cfg(target_arch = "bpf")]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        // The verifier rejects any reachable panic path; this is never called.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

/// The BPF object is only meaningful for `bpfel-unknown-none`; on the host
/// this crate compiles to a program that does nothing, so that
/// `cargo clippy --workspace` checks the same code.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
