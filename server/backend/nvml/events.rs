//! XID events: NVML event sets, waited on by one thread per backend.
//!
//! `EventSet::wait` blocks in the driver, and an `EventSet` may move between
//! threads but not be shared, so each GPU gets its own set, registered on the
//! opening thread and then handed to the backend's event thread. That thread
//! waits on every set in turn with a short timeout and forwards each XID to
//! its GPU's channel, which the device empties in `drain_events`.
//!
//! Lifetimes: a set lives while its device's current registration token
//! does (a device re-registering after a loss replaces the token, which
//! retires the old set); a set whose GPU is lost is dropped and registered
//! again when the GPU returns. The thread ends once the backend and all its
//! devices are gone (the registration channel disconnects and no set is
//! left): that is its stop signal.

use std::{
    sync::{
        Arc, Weak,
        mpsc::{self, Receiver, Sender, TryRecvError},
    },
    thread,
    time::Duration,
};

use nvml_wrapper::{
    Device, EventSet, Nvml, bitmasks::event::EventTypes, enums::event::XidError, error::NvmlError,
};

use crate::backend::DeviceEvent;

/// Time the thread waits on all sets together, per round.
const ROUND: Duration = Duration::from_millis(200);
/// Bounds of the wait on one set.
const MIN_WAIT_MS: u32 = 10;
const MAX_WAIT_MS: u32 = 100;
/// What NVML reports when it does not know the XID.
const UNKNOWN_XID: u64 = 999;

/// One GPU's event set, owned by the event thread.
struct Watch {
    index: u32,
    set: EventSet<'static>,
    deliver: Sender<DeviceEvent>,
    /// Dead once the device is dropped or has registered a newer set.
    owner: Weak<()>,
}

/// The backend's side: where new registrations go.
#[derive(Debug)]
pub(super) struct EventWatcher {
    /// `None` when the event thread could not be started.
    registrations: Option<Sender<Watch>>,
}

impl EventWatcher {
    /// Starts the event thread. Without it, devices run without events.
    pub(super) fn start() -> Self {
        let (tx, rx) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("gpuwatch-nvml-events".into())
            .spawn(move || run(&rx));
        match spawned {
            Ok(_) => Self {
                registrations: Some(tx),
            },
            Err(e) => {
                tracing::warn!("cannot start the NVML event thread, XID events are off: {e}");
                Self {
                    registrations: None,
                }
            }
        }
    }

    /// The event plumbing for one device, registered for XIDs if the GPU
    /// supports them.
    pub(super) fn attach(
        &self,
        nvml: &'static Nvml,
        device: &Device<'static>,
        index: u32,
    ) -> DeviceEvents {
        let (tx, rx) = mpsc::channel();
        let mut events = DeviceEvents {
            rx,
            tx,
            owner: Arc::new(()),
            registrations: self.registrations.clone(),
            index,
            active: false,
        };
        events.register(nvml, device);
        events
    }
}

/// A device's side: its event channel and registration.
#[derive(Debug)]
pub(super) struct DeviceEvents {
    rx: Receiver<DeviceEvent>,
    tx: Sender<DeviceEvent>,
    owner: Arc<()>,
    registrations: Option<Sender<Watch>>,
    index: u32,
    active: bool,
}

impl DeviceEvents {
    /// True when XIDs are being watched for this GPU.
    pub(super) fn active(&self) -> bool {
        self.active
    }

    /// (Re)registers `device` for XID events, retiring any earlier set.
    /// Returns whether events are now watched.
    pub(super) fn register(&mut self, nvml: &'static Nvml, device: &Device<'static>) -> bool {
        self.owner = Arc::new(());
        self.active = match self.try_register(nvml, device) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!("GPU {}: XID events not available: {e}", self.index);
                false
            }
        };
        self.active
    }

    fn try_register(&self, nvml: &'static Nvml, device: &Device<'static>) -> Result<(), String> {
        let registrations = self
            .registrations
            .as_ref()
            .ok_or("the event thread is not running")?;
        let supported = device.supported_event_types().map_err(|e| e.to_string())?;
        if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
            return Err("the GPU does not report XID errors".into());
        }
        let set = nvml.create_event_set().map_err(|e| e.to_string())?;
        let set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| e.error.to_string())?;
        registrations
            .send(Watch {
                index: self.index,
                set,
                deliver: self.tx.clone(),
                owner: Arc::downgrade(&self.owner),
            })
            .map_err(|_| "the event thread has stopped".to_string())
    }

    /// Events received since the last call.
    pub(super) fn drain(&self) -> Vec<DeviceEvent> {
        self.rx.try_iter().collect()
    }
}

/// The event thread.
fn run(registrations: &Receiver<Watch>) {
    let mut watches: Vec<Watch> = Vec::new();
    let mut connected = true;
    loop {
        while connected {
            match registrations.try_recv() {
                Ok(w) => watches.push(w),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => connected = false,
            }
        }
        watches.retain(|w| w.owner.strong_count() > 0);
        if watches.is_empty() {
            if !connected {
                return;
            }
            // Nothing to wait on: sleep until a device registers.
            match registrations.recv() {
                Ok(w) => watches.push(w),
                Err(_) => return,
            }
            continue;
        }
        let n = u32::try_from(watches.len()).unwrap_or(u32::MAX);
        let wait_ms = (ROUND.as_millis() as u32 / n).clamp(MIN_WAIT_MS, MAX_WAIT_MS);
        watches.retain(|w| wait_once(w, wait_ms));
    }
}

/// Waits on one set; false when the set should be dropped.
fn wait_once(watch: &Watch, wait_ms: u32) -> bool {
    match watch.set.wait(wait_ms) {
        Ok(data) => {
            if watch.owner.strong_count() == 0 {
                // Retired while waiting (its device re-registered or went
                // away): the newer set reports this event, if anyone needs it.
                return false;
            }
            if let Some(xid) = data.event_data {
                let code = match xid {
                    XidError::Value(v) => v,
                    XidError::Unknown => UNKNOWN_XID,
                };
                // A closed channel means the device is gone; the owner check
                // retires the set on the next round.
                let _ = watch.deliver.send(DeviceEvent::Xid(code));
            }
            true
        }
        Err(NvmlError::Timeout) => true,
        Err(NvmlError::GpuLost) => {
            tracing::debug!(
                "GPU {}: lost, dropping its event set until it returns",
                watch.index
            );
            false
        }
        Err(e) => {
            tracing::debug!("GPU {}: waiting for events failed: {e}", watch.index);
            // Do not spin on an error that repeats.
            thread::sleep(Duration::from_millis(u64::from(wait_ms)));
            true
        }
    }
}
