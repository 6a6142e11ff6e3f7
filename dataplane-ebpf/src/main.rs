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
mod zeroed;

mod programs {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    use crate::{decap, forward};

    /// XDP on the underlay interface: decapsulate VXLAN for this node.
    #[xdp]
    pub fn weft_xdp_decap(ctx: XdpContext) -> u32 {
        match decap::xdp(&ctx) {
            Ok(action) => action,
            Err(()) => xdp_action::XDP_ABORTED,
        }
    }

    /// TC ingress on a pod's host-side veth: traffic from the pod.
    #[classifier]
    pub fn weft_from_pod(ctx: TcContext) -> i32 {
        match forward::try_forward(&ctx, forward::Origin::Pod) {
            Ok(action) => action,
            Err(()) => forward::TC_ACT_SHOT,
        }
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
        match forward::try_forward(&ctx, forward::Origin::Host) {
            Ok(action) => action,
            Err(()) => forward::TC_ACT_SHOT,
        }
    }

    /// TC ingress on the underlay: decapsulate VXLAN for this node (the
    /// `tc` decap mode, instead of XDP).
    #[classifier]
    pub fn weft_from_und(ctx: TcContext) -> i32 {
        match decap::tc(&ctx) {
            Ok(action) => action,
            Err(()) => forward::TC_ACT_SHOT,
        }
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
