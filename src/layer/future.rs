use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use super::Limits;
use super::settlement::{Ending, Settlement};
use crate::error::{BoxError, Error};
use crate::llm::ReportsUsage;

pin_project! {
    /// Response future of [`Ratelimited`](super::Ratelimited): acquire, call, settle.
    ///
    /// Dropping it at any point settles the call in the background (see the module docs).
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R>,
        settlement: Option<Settlement>,
        limits: Option<Arc<Limits>>,
        tag: String,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R>
    where
        S: Service<R>,
    {
        Failed { error: Option<Error> },
        Acquiring { service: Option<S>, request: Option<R> },
        Calling { #[pin] future: S::Future },
        Settling { result: Option<Result<S::Response, Error>> },
        Done,
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    pub(crate) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            settlement: None,
            limits: None,
            tag: String::new(),
        }
    }

    pub(crate) fn acquiring(
        service: S,
        request: R,
        settlement: Settlement,
        limits: Arc<Limits>,
        tag: String,
    ) -> Self {
        Self {
            state: State::Acquiring {
                service: Some(service),
                request: Some(request),
            },
            settlement: Some(settlement),
            limits: Some(limits),
            tag,
        }
    }
}

impl<S, R> Future for ResponseFuture<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    S::Response: ReportsUsage,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Failed { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| Error::invalid_input("future polled after completion"));
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Acquiring { service, request } => {
                    let Some(settlement) = this.settlement.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::invalid_input("missing settlement")));
                    };
                    let decisions = match ready!(settlement.poll_acquire(cx)) {
                        Ok(d) => d,
                        Err(error) => {
                            tracing::error!(identifier = %this.tag, %error, "rate-limit store failed");
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::Store(error)));
                        }
                    };
                    if !decisions.iter().all(|d| d.allowed) {
                        let limits = this.limits.as_deref();
                        let error = match limits {
                            Some(l) => {
                                let (name, error) = l.denial(&decisions);
                                l.remember_denial(this.tag, name, &error);
                                error
                            }
                            None => Error::invalid_input("missing limits"),
                        };
                        tracing::info!(identifier = %this.tag, %error, "rate limit denied a call");
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    let (Some(mut service), Some(request)) = (service.take(), request.take())
                    else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::invalid_input(
                            "future polled after completion",
                        )));
                    };
                    let future = service.call(request);
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    let result = match result {
                        Ok(response) => {
                            if let Some(s) = this.settlement.as_mut() {
                                s.start(Ending::Delivered(response.reported_usage().as_ref()));
                            }
                            Ok(response)
                        }
                        Err(error) => {
                            if let Some(s) = this.settlement.as_mut() {
                                s.start(Ending::Failed);
                            }
                            Err(Error::Inner(error.into()))
                        }
                    };
                    this.state.set(State::Settling {
                        result: Some(result),
                    });
                }
                StateProj::Settling { result } => {
                    if let Some(s) = this.settlement.as_mut() {
                        ready!(s.poll_write(cx));
                    }
                    let result = result.take().unwrap_or_else(|| {
                        Err(Error::invalid_input("future polled after completion"))
                    });
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => {
                    return Poll::Ready(Err(Error::invalid_input(
                        "future polled after completion",
                    )));
                }
            }
        }
    }
}
