//! An agent's availability, aggregated over the agent's devices.
//!
//! An agent is one person with possibly several connections (two console
//! tabs, a phone). Routing must see one agent, so status is a property of
//! the person, not of a connection:
//!
//! - A new agent is `offline` until some device sends `presence`
//!   (PROTOCOL.md, "Semantics"). Connecting alone changes nothing.
//! - `presence` from any device sets the agent's status everywhere: the
//!   agent said "away" on the phone, so the agent is away.
//! - When the **last** device leaves, the agent goes `offline`. If a device
//!   comes back within the grace period (`routing.offline_grace_s`), the
//!   status the agent had is restored, so a network blip does not need a
//!   new `presence`; after the grace period the agent is offline until it
//!   says otherwise.
//! - One connection more than `routing.max_devices_per_agent` replaces the
//!   oldest (which the gateway closes with 4002).
//!
//! `online` takes new conversations; `away` keeps its conversations but
//! takes no new ones; `offline` takes none and is subject to
//! `routing.offline_policy`. That policy lives in [`crate::routing`]; this
//! file only says which status the agent has.

use kefu_proto::ids::PresenceStatus;

/// Names one connection of an agent (the gateway's connection id).
pub type DeviceId = u64;

/// What a device connecting changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Connected {
    /// The agent's new status, if it changed (a restore within grace).
    pub changed: Option<PresenceStatus>,
    /// The device this one pushed out, to be closed with 4002.
    pub replaced: Option<DeviceId>,
}

/// `presence` from a device that is not connected (a gateway bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device {0} is not connected")]
pub struct UnknownDevice(pub DeviceId);

/// One agent's devices and status.
#[derive(Debug, Clone)]
pub struct Presence {
    /// Connected devices, oldest first; at most `max_devices`.
    devices: Vec<DeviceId>,
    max_devices: usize,
    status: PresenceStatus,
    /// The status before the last device left, and until when (ms) a
    /// reconnect restores it.
    dropped: Option<(PresenceStatus, u64)>,
}

impl Presence {
    /// An agent with no devices, offline.
    pub fn new(max_devices: usize) -> Presence {
        Presence {
            devices: Vec::new(),
            max_devices: max_devices.max(1),
            status: PresenceStatus::Offline,
            dropped: None,
        }
    }

    /// The agent's status.
    pub fn status(&self) -> PresenceStatus {
        self.status
    }

    /// Connected devices.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// A device connected at `now_ms`. Connecting again is a no-op.
    pub fn connect(&mut self, device: DeviceId, now_ms: u64) -> Connected {
        let mut out = Connected::default();
        if self.devices.contains(&device) {
            return out;
        }
        if self.devices.len() >= self.max_devices {
            out.replaced = Some(self.devices.remove(0));
        }
        self.devices.push(device);
        if let Some((status, until_ms)) = self.dropped.take()
            && now_ms < until_ms
            && status != self.status
        {
            self.status = status;
            out.changed = Some(status);
        }
        out
    }

    /// A device left at `now_ms`. Returns the new status if it changed
    /// (the last device left an agent who was not offline).
    pub fn disconnect(&mut self, device: DeviceId, now_ms: u64, grace_ms: u64) -> Option<PresenceStatus> {
        let i = self.devices.iter().position(|&d| d == device)?;
        self.devices.remove(i);
        if !self.devices.is_empty() || self.status == PresenceStatus::Offline {
            return None;
        }
        self.dropped = Some((self.status, now_ms.saturating_add(grace_ms)));
        self.status = PresenceStatus::Offline;
        Some(PresenceStatus::Offline)
    }

    /// `presence {status}` from `device`. Returns the new status if it changed.
    pub fn set(
        &mut self,
        device: DeviceId,
        status: PresenceStatus,
    ) -> Result<Option<PresenceStatus>, UnknownDevice> {
        if !self.devices.contains(&device) {
            return Err(UnknownDevice(device));
        }
        self.dropped = None;
        if status == self.status {
            return Ok(None);
        }
        self.status = status;
        Ok(Some(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PresenceStatus::{Away, Offline, Online};

    const GRACE: u64 = 60_000;

    #[test]
    fn offline_until_presence_is_sent() {
        let mut p = Presence::new(8);
        assert_eq!(p.connect(1, 0), Connected::default());
        assert_eq!(p.status(), Offline);
        assert_eq!(p.set(1, Online), Ok(Some(Online)));
        assert_eq!(p.set(1, Online), Ok(None), "no change, nothing to announce");
        assert_eq!(p.set(9, Away), Err(UnknownDevice(9)));
    }

    #[test]
    fn several_devices_are_one_agent() {
        let mut p = Presence::new(8);
        p.connect(1, 0);
        p.set(1, Online).unwrap();
        // A second tab: still one online agent, nothing changes.
        assert_eq!(p.connect(2, 10), Connected::default());
        assert_eq!((p.status(), p.devices()), (Online, 2));
        // Away from the phone is away everywhere.
        assert_eq!(p.set(2, Away), Ok(Some(Away)));
        // One tab closes: still there.
        assert_eq!(p.disconnect(1, 20, GRACE), None);
        assert_eq!(p.status(), Away);
        // The last one closes: offline.
        assert_eq!(p.disconnect(2, 30, GRACE), Some(Offline));
        assert_eq!((p.status(), p.devices()), (Offline, 0));
        assert_eq!(p.disconnect(2, 31, GRACE), None, "leaving twice is harmless");
    }

    #[test]
    fn reconnect_within_grace_restores_the_status() {
        let mut p = Presence::new(8);
        p.connect(1, 0);
        p.set(1, Online).unwrap();
        p.disconnect(1, 1_000, GRACE);
        assert_eq!(p.connect(2, 1_000 + GRACE - 1).changed, Some(Online));
        assert_eq!(p.status(), Online);
        // After the grace period, offline until the agent says otherwise.
        p.disconnect(2, 100_000, GRACE);
        assert_eq!(p.connect(3, 100_000 + GRACE).changed, None);
        assert_eq!(p.status(), Offline);
    }

    #[test]
    fn an_explicit_offline_is_not_undone_by_reconnecting() {
        let mut p = Presence::new(8);
        p.connect(1, 0);
        p.set(1, Online).unwrap();
        p.set(1, Offline).unwrap();
        p.disconnect(1, 10, GRACE);
        assert_eq!(p.connect(2, 20).changed, None);
        assert_eq!(p.status(), Offline);
    }

    #[test]
    fn one_device_too_many_replaces_the_oldest() {
        let mut p = Presence::new(2);
        p.connect(1, 0);
        p.connect(2, 0);
        assert_eq!(p.connect(3, 0).replaced, Some(1));
        assert_eq!(p.devices(), 2);
        assert_eq!(p.set(1, Online), Err(UnknownDevice(1)));
        assert_eq!(p.connect(3, 0), Connected::default(), "the same device twice is one device");
    }
}
