//! Where a handler's outcome becomes the program's verdict, and every drop
//! is counted: handlers return the action or a [`DropReason`] (Cilium's
//! "return the reason, drop at the tail", `send_drop_notify_error`), and
//! the entry points end with [`tc`] or [`xdp`]. No other code returns
//! `TC_ACT_SHOT` or `XDP_DROP`.

use aya_ebpf::{
    bindings::xdp_action::XDP_DROP,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use weft_common::DropReason;

use crate::{maps::count_drop, parse::says_ipv6};

/// TC verdicts (linux/pkt_cls.h). Defined here as `i32` because the
/// bindings' type differs between the BPF target and the host.
///
/// "No verdict": the next program or tc filter on the hook decides, and
/// without one the packet goes on (up the stack, or to the qdisc). How
/// every weft TC program lets a packet pass, so that what follows it on the
/// hook still runs (the `bandwidth` plugin's filter on a pod's veth, another
/// tool's on the underlay); `TC_ACT_OK` would end the hook there with TCX.
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;

/// What a handler decided: the action, or why the packet is dropped.
pub type Verdict<T> = Result<T, DropReason>;

/// A TC handler's outcome as the program's return value; a drop is counted
/// and, at debug log level (a load-time global: pruned by the verifier when
/// off), said.
#[inline(always)]
pub fn tc(ctx: &TcContext, v: Verdict<i32>) -> i32 {
    match v {
        Ok(action) => action,
        Err(reason) => {
            // The frame's family (for the underlay's programs, the outer
            // frame's: VXLAN dropped before it is opened).
            count_drop(reason, says_ipv6(ctx.data(), ctx.data_end()));
            debug!(ctx, "weft tc: drop {}", reason.name());
            TC_ACT_SHOT
        }
    }
}

/// The XDP twin of [`tc`].
#[inline(always)]
pub fn xdp(ctx: &XdpContext, v: Verdict<u32>) -> u32 {
    match v {
        Ok(action) => action,
        Err(reason) => {
            // The frame's family (for the underlay's programs, the outer
            // frame's: VXLAN dropped before it is opened).
            count_drop(reason, says_ipv6(ctx.data(), ctx.data_end()));
            debug!(ctx, "weft xdp: drop {}", reason.name());
            XDP_DROP
        }
    }
}
