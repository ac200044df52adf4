use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::engine::call::{Call, Outcome};
use crate::engine::settlement::{Ending, Settlement};
use crate::error::{BoxError, Error};
use crate::llm::ReportsUsage;

pin_project! {
    /// Response future of [`Ratelimited`](super::Ratelimited): acquire, call, settle.
    ///
    /// Dropping it at any point settles the call in the background (see the module
    /// docs). Polling it after it completed panics.
    pub struct ResponseFuture<S, R>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R>
    where
        S: Service<R>,
    {
        Failed { error: Option<Error> },
        Calling { #[pin] call: Call<S, R> },
        Settling { settlement: Settlement, result: Option<Result<S::Response, Error>> },
        Done,
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    pub(crate) fn failed(error: Error) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }

    pub(crate) fn new(call: Call<S, R>) -> Self {
        Self {
            state: State::Calling { call },
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
                    let error = error.take().expect("future polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Calling { call } => match ready!(call.poll(cx)) {
                    Outcome::Refused { error, .. } => {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    Outcome::Called {
                        result,
                        mut settlement,
                        ..
                    } => {
                        let result = match result {
                            Ok(response) => {
                                settlement
                                    .start(Ending::Delivered(response.reported_usage().as_ref()));
                                Ok(response)
                            }
                            Err(error) => {
                                settlement.start(Ending::Failed);
                                Err(Error::Inner(error.into()))
                            }
                        };
                        this.state.set(State::Settling {
                            settlement,
                            result: Some(result),
                        });
                    }
                },
                StateProj::Settling { settlement, result } => {
                    ready!(settlement.poll_write(cx));
                    let result = result.take().expect("future polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => panic!("future polled after completion"),
            }
        }
    }
}
